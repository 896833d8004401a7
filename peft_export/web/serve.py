"""A static server for a site that also sends the two cross-origin-isolation headers.

Multi-threaded wasm needs ``SharedArrayBuffer``, which browsers give a page only when it is
cross-origin isolated: its responses carry

    Cross-Origin-Opener-Policy: same-origin
    Cross-Origin-Embedder-Policy: require-corp

``python -m http.server -d SITE`` sends neither, so the page runs the decoder on one thread
(it says so in its status line); any server that adds the two headers gets all cores.
``python -m peft_export.web.serve SITE`` is such a server (standard library only).
"""

from __future__ import annotations

import functools
import http.server
import sys
from pathlib import Path
from typing import Optional

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; with ``isolate`` adds ``ISOLATION_HEADERS`` to every response."""

    isolate = True
    quiet = False
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}

    def end_headers(self) -> None:
        if self.isolate:
            for key, value in ISOLATION_HEADERS.items():
                self.send_header(key, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)


def make_server(site: str | Path, host: str = "127.0.0.1", port: int = 8000, isolate: bool = True,
                quiet: bool = False) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server for ``site`` (port 0: any free port; ``server.server_address``)."""
    handler = type("Handler", (SiteHandler,), {"isolate": isolate, "quiet": quiet})
    return http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(site)))


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m peft_export.web.serve",
                                     description="Serve a `peftexport web` site with COOP/COEP (multi-threaded wasm).")
    parser.add_argument("site", type=Path)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: {args.site}: not a site (no index.html)", file=sys.stderr)
        return 2
    server = make_server(args.site, args.bind, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.site} at http://{host}:{port}/ (cross-origin isolated; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
