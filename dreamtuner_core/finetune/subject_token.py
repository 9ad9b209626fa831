"""[S*], the subject's token: one trainable vector per text encoder, put in place by a hook on its token table.

[S*] is a new token vector per text encoder (one for SD1.x/SD2.x, clip_l and
clip_g for SDXL), initialised from the class word's token vectors (a class
word of several tokens: the mean of its tokens' vectors) and trained at its
own learning rate. The text encoder's token table is never written: during
training a forward hook on the token-embedding module puts the trainable
vector at the placeholder's position. It is saved in the format the host's
embedding loader reads (``{embedding_key: [1, width]}``), so
``embedding:<name>`` in a prompt gives exactly the trained vector.
"""

from __future__ import annotations

import torch

from ..errors import DreamTunerInputError


def text_encoders(clip):
    """{tokens key: (tokenizer, text model)} for the CLIP families the trainer knows ('l', 'g', 'h')."""
    out = {}
    for key in ("l", "g", "h"):
        tokenizer = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None)
        model = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
        if tokenizer is not None and model is not None and hasattr(model, "transformer"):
            out[key] = (tokenizer, model)
    return out


def _token_ids(pairs):
    return [int(p[0]) for p in pairs if isinstance(p[0], int) or (torch.is_tensor(p[0]) and p[0].ndim == 0)]


class TokenSlot:
    """[S*] for one text encoder: placeholder id, position, trainable vector, hook on the token table."""

    def __init__(self, key, tokenizer, text_model, class_ids, placeholder):
        self.key, self.tokenizer, self.text_model = key, tokenizer, text_model
        self.placeholder = placeholder
        table = text_model.transformer.get_input_embeddings()
        with torch.no_grad():
            rows = table.weight[torch.tensor(class_ids, device=table.weight.device)].float()
            # A class word of several tokens: the mean of its tokens' vectors (documented choice).
            self.vector = torch.nn.Parameter(rows.mean(dim=0).detach().clone().cpu())
        self._handle = None

    @property
    def embedding_key(self):
        return getattr(self.tokenizer, "embedding_key", f"clip_{self.key}")

    def _hook(self, module, args, output):
        ids = args[0]
        where = (ids == self.placeholder)
        if not bool(where.any()):
            return output
        vector = self.vector.to(device=output.device, dtype=output.dtype)
        return torch.where(where[..., None], vector.expand_as(output), output)

    def install(self):
        table = self.text_model.transformer.get_input_embeddings()
        self._handle = table.register_forward_hook(self._hook)

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _class_tokens(clip, class_word):
    """clip.tokenize('a <class word>') and, per encoder, the class word's own token ids."""
    prompt = clip.tokenize(f"a {class_word}")
    words = clip.tokenize(class_word)
    ids = {}
    for key, (tokenizer, _) in text_encoders(clip).items():
        special = {getattr(tokenizer, "start_token", None), getattr(tokenizer, "end_token", None),
                   getattr(tokenizer, "pad_token", None)}
        own = [i for i in _token_ids(words[key][0]) if i not in special]
        if not own:
            raise DreamTunerInputError(f"class_word {class_word!r} gives no tokens; use a word such as 'dog'.")
        ids[key] = own
    return prompt, ids


def _insert_placeholder(pairs, placeholder, end_token):
    """The token list of 'a <class word> [S*]' as the tokenizer gives 'a <class word> embedding:<name>'.

    The embedding's row takes the place right after the prompt's words (before the end token) and the
    sequence keeps its length (one pad less).
    """
    pairs = [tuple(p) for p in pairs]
    ids = [int(p[0]) for p in pairs]
    position = ids.index(end_token, 1)
    item = (placeholder,) + tuple(pairs[position - 1][1:])
    out = pairs[:position] + [item] + pairs[position:]
    return out[:-1] if len(out) > len(pairs) and ids[-1] == ids[-2] else out


def _pick_placeholder(tokenizer, used):
    """A token id the prompts never contain; its row is never read (the hook replaces it)."""
    end = int(getattr(tokenizer, "end_token", 49407))
    for candidate in range(end - 2, 0, -1):
        if candidate not in used:
            return candidate
    raise RuntimeError("no free token id")


def build_prompts(clip, class_word):
    """(tokens of 'a <class>', tokens of 'a <class> [S*]', {key: TokenSlot})."""
    plain, class_ids = _class_tokens(clip, class_word)
    subject, slots = {}, {}
    for key, (tokenizer, text_model) in text_encoders(clip).items():
        used = set()
        for batch in plain[key]:
            used.update(_token_ids(batch))
        placeholder = _pick_placeholder(tokenizer, used)
        end = int(getattr(tokenizer, "end_token", 49407))
        first = _insert_placeholder(plain[key][0], placeholder, end)
        subject[key] = [first] + [list(b) for b in plain[key][1:]]
        slots[key] = TokenSlot(key, tokenizer, text_model, class_ids[key], placeholder)
    for key in plain:
        subject.setdefault(key, plain[key])
    return plain, subject, slots


def encode_text(clip, tokens):
    """(cond, pooled) through the host's own encode path."""
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled
