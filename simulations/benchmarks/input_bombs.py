"""Memory of decoding hostile ("bomb") images and of legitimate ones at the size limit.

    python simulations/benchmarks/input_bombs.py [--out results/bombs.json]

Each file is read by the site's own reader (``read_image_file`` / ``read_dicom_image``, 224 px output)
in a fresh Python process; the figure is the growth of that process's peak resident memory
(``ru_maxrss``) over its baseline after imports and a warm-up read. Bombs: a 10000 x 10000 PNG
(constant rows, ~100 KB), a deflated 16-bit 7500 x 7500 DICOM with a rescale and a window (110 KB), and the same
image RLE-compressed. Legitimate files at the default limit (32 Mpx): a 5600 x 5600 8-bit PNG and a
16-bit deflated DICOM with a rescale and a window. Run it against another checkout with
``PYTHONPATH=<checkout>`` to compare (an older reader without ``max_pixels`` decodes everything).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
import pydicom
from fedtl.data.dicom import read_dicom_image
from fedtl.data.pixels import read_image_file
path, kind = Path(sys.argv[1]), sys.argv[2]
reader = read_dicom_image if kind == "dicom" else read_image_file
warm = Path(sys.argv[3])
reader(warm, 224)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    out = reader(path, 224)
    result = f"decoded to {out.shape}"
except Exception as exc:
    result = f"refused: {type(exc).__name__}: {exc}"
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_mb": round((peak - base) / 1024, 1), "seconds": round(seconds, 3), "result": result}))
"""


def png_rows(path: Path, width: int, height: int) -> Path:
    """An 8-bit grayscale PNG of constant rows (row y is y mod 256), written row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, parts = zlib.compressobj(6), []
    for y in range(height):
        parts.append(deflate.compress(b"\0" + bytes([y % 256]) * width))
    parts.append(deflate.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def dicom(path: Path, rows: int, cols: int, syntax: str) -> Path:
    """A 16-bit MONOCHROME2 DICOM (12 bits stored, rescale slope/intercept, a window), pixels a slow ramp."""
    import numpy as np
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = "1.5", "-1024", "40", "400"
    ds.PixelData = (np.arange(rows, dtype="<u2")[:, None] // 4 % 4096 * np.ones(cols, "<u2")).astype("<u2").tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def measure(path: Path, kind: str, warm: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), kind, str(warm)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        warm_png = png_rows(t / "warm.png", 64, 64)
        warm_dcm = dicom(t / "warm.dcm", 64, 64, DeflatedExplicitVRLittleEndian)
        cases = [
            ("bomb", "PNG 10000x10000 (100 Mpx)", png_rows(t / "bomb.png", 10000, 10000), "image"),
            ("bomb", "DICOM deflated 7500x7500 16-bit", dicom(t / "bomb.dcm", 7500, 7500, DeflatedExplicitVRLittleEndian), "dicom"),
            ("bomb", "DICOM RLE 7500x7500 16-bit", dicom(t / "rle.dcm", 7500, 7500, RLELossless), "dicom"),
            ("at limit", "PNG 5600x5600 (31.4 Mpx)", png_rows(t / "big.png", 5600, 5600), "image"),
            ("at limit", "DICOM deflated 5600x5600 16-bit", dicom(t / "big.dcm", 5600, 5600, DeflatedExplicitVRLittleEndian), "dicom"),
        ]
        for group, name, path, kind in cases:
            row = {"group": group, "file": name, "file_kb": round(path.stat().st_size / 1024, 1),
                   **measure(path, kind, warm_dcm if kind == "dicom" else warm_png)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
