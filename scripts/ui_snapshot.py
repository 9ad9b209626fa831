#!/usr/bin/env python3
"""Load ComfyUI UI-format workflows into the real ComfyUI web frontend (headless
Chromium via Playwright), screenshot the canvas and dump what the frontend
converts them to.

For every ``--workflow W.json`` this writes into ``--out-dir``:

  <stem>.png       screenshot of the page after "fit view"
  <stem>.api.json  ``(await app.graphToPrompt()).output``   (API / prompt format)
  <stem>.ui.json   ``(await app.graphToPrompt()).workflow`` (UI format as re-saved)
  <stem>.log       timings, dialogs/toasts text, missing node types,
                   browser console errors/warnings, failed requests

and prints one summary line per workflow.  Exit status is 1 if any workflow
failed to load/convert.

Requirements: the ``playwright`` Python package (no browser download needed:
a system Chromium is used, see ``--chromium``) and a running ComfyUI server.

The server's user settings are NOT modified: ``GET /settings`` is intercepted
and a few overrides are merged in (tutorial completed -> no template browser
on first run, minimap / canvas-info overlay hidden, ...), and every settings
write from the page is answered locally without reaching the server.
Requests to any other origin are aborted (the page works offline).

Example:
  python scripts/ui_snapshot.py --url http://127.0.0.1:8188 \
      --workflow a.json --workflow b.json --out-dir shots/
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
from pathlib import Path

from playwright.async_api import async_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Frontend (1.39.x) settings merged into GET /settings for the page only.
SETTING_OVERRIDES = {
    # Without this a first visit opens the "Templates" browser dialog
    # (loadDefaultWorkflow -> Comfy.BrowseTemplates).
    "Comfy.TutorialCompleted": True,
    # Cosmetic: keep overlays off the screenshot.
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    # Draw titles/widgets at any zoom (default switches to a text-less
    # "level of detail" rendering below ~50% zoom).
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.Toast.DisableReconnectingToast": True,
    # Keep defaults that affect conversion explicit: missing node / model
    # warnings stay on so their dialog text can be logged (then closed).
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
}

# 404s every page load produces on a plain install (optional user files).
BENIGN_404 = ("/user.css", "/api/userdata/user.css", "/api/userdata?dir=workflows",
              "/api/userdata?dir=subgraphs", "/api/userdata/comfy.templates.json")

# --- JavaScript snippets ---------------------------------------------------

JS_READY = """() => !!(window.app && window.app.vueAppReady && window.app.canvas
    && window.app.rootGraph && document.querySelector('#graph-canvas'))"""

JS_FRAMES = """(n) => new Promise(res => {
    let i = 0; const step = () => (++i >= n) ? res() : requestAnimationFrame(step);
    requestAnimationFrame(step); })"""

JS_LOAD = """async (wf) => {
    const app = window.app;
    const reg = (window.LiteGraph && window.LiteGraph.registered_node_types) || {};
    const isUi = wf && typeof wf === 'object' && Array.isArray(wf.nodes);
    const missing = new Set();
    if (isUi) {
        const scan = (nodes) => { for (const n of nodes || []) if (!(n.type in reg)) missing.add(n.type); };
        scan(wf.nodes);
        for (const sg of (wf.definitions && wf.definitions.subgraphs) || []) scan(sg.nodes);
        // loadGraphData(graphData, clean, restore_view, workflow, options)
        await app.loadGraphData(wf, true, false, null,
            {showMissingNodesDialog: true, showMissingModelsDialog: true});
    } else {
        // API-format prompt: the frontend can import it too.
        for (const n of Object.values(wf || {})) if (n && n.class_type && !(n.class_type in reg)) missing.add(n.class_type);
        await app.loadApiJson(wf, 'workflow.json');
    }
    return {format: isUi ? 'ui' : 'api', missing: [...missing],
            nodes: app.rootGraph._nodes.length,
            subgraphs: app.rootGraph.subgraphs ? app.rootGraph.subgraphs.size : 0};
}"""

JS_FIT = """async ([margins, maxScale]) => {
    // Deterministic (non-animated) version of the "Fit view" command
    // (Comfy.Canvas.FitView -> canvas.fitViewToSelectionAnimated): fit the
    // bounds of all nodes, groups and reroutes into the part of the window not
    // covered by the UI chrome.
    const app = window.app, c = app.canvas, ds = c.ds;
    c.deselectAll && c.deselectAll();
    const items = c.positionableItems ? [...c.positionableItems] : [...c.graph._nodes, ...(c.graph._groups || [])];
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const it of items) { const b = it.boundingRect; if (!b) continue;
        x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
        x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
    if (!isFinite(x0)) return {items: 0, scale: ds.scale, offset: [...ds.offset]};
    const [ml, mt, mr, mb] = margins;
    const W = c.canvas.width / window.devicePixelRatio, H = c.canvas.height / window.devicePixelRatio;
    const tw = Math.max(W - ml - mr, 100), th = Math.max(H - mt - mb, 100);
    const bw = Math.max(x1 - x0, 1), bh = Math.max(y1 - y0, 1);
    const s = Math.min(tw / bw, th / bh, maxScale);
    ds.scale = s;
    ds.offset[0] = (ml + tw / 2) / s - (x0 + bw / 2);
    ds.offset[1] = (mt + th / 2) / s - (y0 + bh / 2);
    c.setDirty(true, true);
    return {items: items.length, bounds: [x0, y0, bw, bh], scale: s, offset: [...ds.offset]};
}"""

JS_DIALOGS = """() => [...document.querySelectorAll('.p-dialog, [role=dialog], [role=alertdialog]')]
    .filter(d => d.offsetParent !== null || d.getClientRects().length)
    .map(d => (d.innerText || '').trim()).filter(t => t)"""

JS_TOASTS = """() => [...document.querySelectorAll('.p-toast-message')]
    .map(d => (d.innerText || '').trim()).filter(t => t)"""

JS_CLOSE = """() => {
    let n = 0;
    for (const b of document.querySelectorAll(
        '.p-dialog .p-dialog-close-button, .p-dialog-header button[aria-label=Close],' +
        ' [role=dialog] button[aria-label=Close], .p-toast-close-button')) { b.click(); n++; }
    return n; }"""

JS_CONVERT = """async () => {
    const r = await window.app.graphToPrompt();
    return {output: r.output, workflow: r.workflow};
}"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8188", help="ComfyUI server URL")
    p.add_argument("--workflow", action="append", required=True, type=Path,
                   help="UI-format workflow JSON (repeatable)")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--device-scale-factor", type=float, default=1.0,
                   help="devicePixelRatio; 2 gives a sharper, 2x-sized PNG")
    p.add_argument("--focus-mode", action="store_true",
                   help="hide the ComfyUI chrome (sidebar, tabs, run button) - canvas only")
    p.add_argument("--max-scale", type=float, default=1.0,
                   help="never zoom in beyond this when fitting small graphs")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    p.add_argument("--settle-ms", type=int, default=1000,
                   help="extra wait after load/fit before the screenshot (images, fonts)")
    p.add_argument("--timeout", type=float, default=60.0, help="page-ready timeout, seconds")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=JSON",
                   help='extra frontend setting override, e.g. Comfy.Minimap.Visible=true')
    p.add_argument("--headed", action="store_true", help="show the browser (debugging)")
    return p.parse_args(argv)


def dedupe(lines: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for ln in lines:
        counts[ln] = counts.get(ln, 0) + 1
    return [ln if n == 1 else f"{ln}  (x{n})" for ln, n in counts.items()]


class Log:
    def __init__(self):
        self.lines: list[str] = []
        self.t0 = time.monotonic()

    def __call__(self, msg: str):
        self.lines.append(f"[{time.monotonic() - self.t0:7.2f}s] {msg}")


async def install_routes(page, base_url: str, overrides: dict, log: Log):
    base = urllib.parse.urlsplit(base_url)
    origin = f"{base.scheme}://{base.netloc}"
    prefix = base.path.rstrip("/")

    async def handler(route):
        req = route.request
        u = urllib.parse.urlsplit(req.url)
        if f"{u.scheme}://{u.netloc}" != origin:
            if not req.url.startswith(("data:", "blob:")):
                log(f"blocked external request: {req.method} {req.url}")
                await route.abort()
                return
            await route.continue_()
            return
        path = u.path[len(prefix):] if prefix and u.path.startswith(prefix) else u.path
        # frontend calls api.fetchApi -> /api/settings (also /settings)
        p = path[4:] if path.startswith("/api/") else path
        if p == "/settings" and req.method == "GET":
            resp = await route.fetch()
            try:
                data = await resp.json()
            except Exception:  # noqa: BLE001
                data = {}
            data.update(overrides)
            await route.fulfill(response=resp, json=data)
            return
        if p.startswith("/settings") and req.method in ("POST", "PUT"):
            # Don't let the page persist anything into the server's user settings.
            await route.fulfill(status=200, json={})
            return
        await route.continue_()

    await page.route("**/*", handler)


async def close_popups(page, log: Log, record: list[str], tag: str):
    """Log the text of any visible dialogs/toasts, then close them."""
    for _ in range(5):
        dialogs = await page.evaluate(JS_DIALOGS)
        toasts = await page.evaluate(JS_TOASTS)
        for t in dialogs:
            if t not in record:
                record.append(t)
                log(f"{tag} dialog: " + t.replace("\n", " | "))
        for t in toasts:
            if t not in record:
                record.append(t)
                log(f"{tag} toast: " + t.replace("\n", " | "))
        if not dialogs and not toasts:
            return
        clicked = await page.evaluate(JS_CLOSE)
        if not clicked and dialogs:
            await page.keyboard.press("Escape")
        await page.wait_for_timeout(300)


async def snapshot_one(browser, args, overrides, wf_path: Path) -> tuple[bool, str]:
    stem = wf_path.stem
    out = args.out_dir
    log = Log()
    t_start = time.monotonic()
    console: list[str] = []
    http: list[str] = []
    popups: list[str] = []
    ok = False
    info: dict = {}
    api: dict = {}
    try:
        wf = json.loads(wf_path.read_text(encoding="utf-8"))
        ctx = await browser.new_context(viewport={"width": args.width, "height": args.height},
                                        device_scale_factor=args.device_scale_factor)
        page = await ctx.new_page()
        try:
            def on_console(m):
                # "Failed to load resource" duplicates the http/requestfailed lines
                if m.type in ("error", "warning") and not m.text.startswith("Failed to load resource"):
                    console.append(f"console.{m.type}: {m.text}")

            def on_response(r):
                if r.status >= 400:
                    benign = any(b in r.url for b in BENIGN_404) and r.status == 404
                    http.append(f"http {r.status}: {r.request.method} {r.url}"
                                + ("  (benign: optional user file)" if benign else ""))

            def on_failed(r):
                # ERR_FAILED = our own abort (logged as "blocked"); ERR_ABORTED follows
                # most 404s of fetches the page gives up on - both are noise here.
                if r.failure not in ("net::ERR_FAILED", "net::ERR_ABORTED"):
                    http.append(f"request failed ({r.failure}): {r.method} {r.url}")

            page.on("console", on_console)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("response", on_response)
            page.on("requestfailed", on_failed)
            await install_routes(page, args.url, overrides, log)

            await page.goto(args.url, wait_until="domcontentloaded")
            await page.wait_for_function(JS_READY, timeout=args.timeout * 1000)
            # let the start-up default workflow load finish before replacing it
            try:
                await page.wait_for_load_state("networkidle", timeout=10000)
            except Exception:  # noqa: BLE001
                pass
            await page.evaluate(JS_FRAMES, 5)
            t_ready = time.monotonic()
            log(f"page ready in {t_ready - t_start:.2f}s")
            await close_popups(page, log, popups, "startup")

            info = await page.evaluate(JS_LOAD, wf)
            log(f"loaded ({info['format']} format): {info['nodes']} nodes, "
                f"{info['subgraphs']} subgraphs; missing node types: {info['missing']}")
            await page.wait_for_timeout(500)
            await close_popups(page, log, popups, "load")

            if args.focus_mode:
                await page.evaluate(
                    "() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
                await page.evaluate(JS_FRAMES, 3)
            # left, top, right, bottom (px) kept clear of sidebar / tabs+run bar / zoom controls
            margins = [20, 20, 20, 60] if args.focus_mode else [70, 110, 20, 70]
            fit = await page.evaluate(JS_FIT, [margins, args.max_scale])
            log(f"fit view: {fit.get('items')} items, bounds={fit.get('bounds')} "
                f"-> scale={fit['scale']:.3f} offset={[round(v, 1) for v in fit['offset']]}")
            await page.wait_for_timeout(args.settle_ms)
            await close_popups(page, log, popups, "pre-screenshot")
            await page.evaluate(JS_FRAMES, 3)
            await page.mouse.move(args.width - 2, args.height // 2)  # no hover highlight
            await page.evaluate(JS_FRAMES, 2)
            png = out / f"{stem}.png"
            await page.screenshot(path=str(png))
            log(f"screenshot -> {png}")

            res = await page.evaluate(JS_CONVERT)
            api = res["output"]
            (out / f"{stem}.api.json").write_text(json.dumps(api, indent=2) + "\n")
            (out / f"{stem}.ui.json").write_text(json.dumps(res["workflow"], indent=2) + "\n")
            log(f"graphToPrompt: {len(api)} API nodes")
            ok = True
        finally:
            await ctx.close()
    except Exception as e:  # noqa: BLE001
        log(f"FAILED: {type(e).__name__}: {e}")
    elapsed = time.monotonic() - t_start
    log(f"total {elapsed:.2f}s")

    n_err = sum(1 for c in console if not c.startswith("console.warning"))
    n_warn = len(console) - n_err
    n_http = sum(1 for h in http if "(benign" not in h)
    with open(out / f"{stem}.log", "w", encoding="utf-8") as fh:
        fh.write(f"workflow: {wf_path}\nurl: {args.url}\n")
        fh.write(f"setting overrides: {json.dumps(overrides)}\n\n")
        fh.write("\n".join(log.lines) + "\n")
        fh.write(f"\n== missing node types ({len(info.get('missing', []))})\n")
        fh.write("".join(f"{t}\n" for t in info.get("missing", [])))
        fh.write(f"\n== dialogs/toasts ({len(popups)})\n")
        fh.write("".join(f"--\n{t}\n" for t in popups))
        fh.write(f"\n== console errors/warnings ({len(console)})\n")
        fh.write("".join(f"{c}\n" for c in dedupe(console)))
        fh.write(f"\n== failed / non-2xx requests ({len(http)})\n")
        fh.write("".join(f"{h}\n" for h in dedupe(http)))

    status = "OK  " if ok else "FAIL"
    summary = (f"{status} {wf_path.name}: ui_nodes={info.get('nodes', '?')} api_nodes={len(api)} "
               f"missing={len(info.get('missing', []))} dialogs={len(popups)} "
               f"errors={n_err} warnings={n_warn} http_fail={n_http} {elapsed:.1f}s -> {out / stem}.{{png,api.json,ui.json,log}}")
    return ok, summary


async def main_async(args) -> int:
    overrides = dict(SETTING_OVERRIDES)
    for kv in args.setting:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    args.out_dir.mkdir(parents=True, exist_ok=True)
    all_ok = True
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=args.chromium,
                                           headless=not args.headed, args=CHROMIUM_ARGS)
        try:
            for wf in args.workflow:
                ok, summary = await snapshot_one(browser, args, overrides, wf)
                all_ok &= ok
                print(summary, flush=True)
        finally:
            await browser.close()
    return 0 if all_ok else 1


def main(argv=None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
