"""Serve several adapters from one export over HTTP: numpy + onnxruntime, no torch.

    peftexport merge-and-export --adapter nuclei=runs/nuclei --adapter cells=runs/cells --out multi
    python examples/serve_adapters.py multi --port 8000

    curl localhost:8000/adapters
    curl --data-binary @img.png "localhost:8000/segment?adapter=nuclei&box=40,40,120,120"
    curl --data-binary @img.png "localhost:8000/segment?adapter=all&box=40,40,120,120"

One ``SamSession`` serves every adapter: the shared trunk's weights are loaded once, and an
image posted again (for another adapter, or another prompt) is not encoded again: the last
few encoded images are kept by the sha256 of their bytes, so the trunk runs once per image
and each adapter's head on the first request that needs it. Requests are served by threads;
the session and an encoded image may be shared by them.

POST /segment?adapter=NAME|all&box=x0,y0,x1,y1 (or &points=x,y[,label];...), body = the image
file (PNG, JPEG, TIFF or NPY) -> JSON per adapter: predicted IoU, mask area, the mask's bounding
box and the mask itself run-length encoded (row-major; counts alternate 0-run, 1-run).
"""

import argparse
import hashlib
import io
import json
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np

from peft_export.runtime import SamSession


def read_image(data: bytes) -> np.ndarray:
    if data[:6] == b"\x93NUMPY":
        return np.load(io.BytesIO(data))
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        import tifffile

        return tifffile.imread(io.BytesIO(data))
    from PIL import Image  # PNG / JPEG

    return np.asarray(Image.open(io.BytesIO(data)))


def rle(mask: np.ndarray) -> list:
    flat = np.concatenate([[False], mask.ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    runs = np.diff(np.concatenate([[0], edges, [mask.size]]))
    return [int(r) for r in runs]


class Images:
    """The last ``size`` encoded images, by the sha256 of their bytes."""

    def __init__(self, session: SamSession, size: int = 4) -> None:
        self.session, self.size = session, size
        self.lock = threading.Lock()
        self.items: "OrderedDict[str, object]" = OrderedDict()

    def get(self, data: bytes):
        key = hashlib.sha256(data).hexdigest()
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key], True
        encoded = self.session.encode(read_image(data))  # runs the trunk (outside the lock)
        with self.lock:
            self.items[key] = encoded
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return encoded, False


def make_handler(session: SamSession, images: Images):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            if urlparse(self.path).path == "/adapters":
                self._reply(200, {"adapters": list(session.adapters), "split_block": session.describe()["split_block"]})
            else:
                self._reply(404, {"error": "GET /adapters or POST /segment"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path != "/segment":
                return self._reply(404, {"error": "POST /segment"})
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                names = list(session.adapters) if q.get("adapter") == "all" else [q.get("adapter")]
                box = np.asarray([float(v) for v in q["box"].split(",")]) if "box" in q else None
                coords = labels = None
                if "points" in q:
                    pts = [[float(v) for v in p.split(",")] for p in q["points"].split(";") if p]
                    coords = np.asarray([p[:2] for p in pts])
                    labels = np.asarray([int(p[2]) if len(p) > 2 else 1 for p in pts])
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoded, cached = images.get(data)
                results = {}
                for name in names:
                    masks, iou, _ = session.predict(point_coords=coords, point_labels=labels, box=box,
                                                    multimask_output=False, embedding=encoded, adapter=name)
                    m = masks[0]
                    ys, xs = np.nonzero(m)
                    results[name] = {
                        "iou": float(iou[0]), "area": int(m.sum()), "shape": list(m.shape),
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] if m.any() else None,
                        "rle": rle(m),
                    }
                self._reply(200, {"image_cached": cached, "results": results})
            except Exception as exc:  # one bad request must not stop the server
                self._reply(400, {"error": str(exc)})

    return Handler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    session = SamSession(args.export_dir, precision=args.precision)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(session, Images(session)))
    print(f"serving {', '.join(session.adapters) or 'one model'} on http://{args.host}:{server.server_port}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
