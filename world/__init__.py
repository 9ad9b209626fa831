"""A small procedural world where DreamTuner's effect can be measured (see world/README.md).

Never imported by the pack or by ComfyUI; it uses the pack as a user does, through its nodes.
"""
