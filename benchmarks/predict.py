"""Predict on CPU: images/s of the predict stage against a bare forward pass of the same model.

The data are real files through the real gate: ``--copies`` copies of pydicom's ``CT_small.dcm``
(128x128, each with its own patient, UIDs and pixels: ``tests/bundles.ct_files``) and the
``brain-ct-new`` demo (12 patients x 4 slices, 512x512), de-identified and audited by
``haven.deid.oneshot.deidentify``.  The model is the demo's: ``efficientnet_lite0`` at 64 px,
3 HU windows (``tests/bundles.write_bundle``; random weights, which cost the same as trained ones).

* stage: :func:`haven.predict.stage.run` on the audited manifest - read each file, decode it with
  the training run's preprocessing, normalize, forward, temperature, decision, one row per file;
* bare: the same network on the same samples, decoded beforehand and normalized, in the same
  batches: ``softmax(model(x))`` under ``torch.inference_mode`` and nothing else.

Both run in this process with the same torch threads, interleaved, best of ``--repeat`` rounds
(after one warm-up batch), and the ratio stage / bare is printed (goal: >= 80 %; the rest is
reading and decoding the files).

    python benchmarks/predict.py                      # 150 CT_small copies + the brain-ct-new demo
    python benchmarks/predict.py --copies 400 --threads 4 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bundles import CT_WINDOWS, ct_files, write_bundle  # noqa: E402


def build(work: Path, copies: int) -> tuple[object, object, int]:
    """(audited Inputs, Bundle, files): CT_small copies and the brain-ct-new demo through the gate."""
    import shutil

    from haven import keys
    from haven.deid.oneshot import deidentify
    from haven.demonew import make_brain_ct_new
    from haven.learn.preprocess import Inputs
    from haven.predict.bundle import Bundle

    src = work / "export"
    ct_files(src / "small", copies)
    make_brain_ct_new(work / "brain")
    # flat, no series folders: the one-shot gate reads parent folder names as labels, and the demo's
    # series folders are <StudyDate>_<Accession> (the audit rightly fails a label that is an identifier)
    (src / "brain").mkdir()
    for i, f in enumerate(sorted((work / "brain" / "dicom").rglob("*.dcm"))):
        shutil.copyfile(f, src / "brain" / f"{i:03d}.dcm")
    key = keys.load_key(keys.create_key(work / "key"))
    gate = deidentify(src, work / "out", key, work=work / "phi")
    if not gate["audit_passed"]:
        raise SystemExit(f"the audit did not pass ({gate['findings']} findings): nothing to benchmark")
    pixels = {"size": 64, "mode": "ct", "windows": CT_WINDOWS, "slab": 0}
    model_pt, metrics = write_bundle(work / "model", classes=["normal", "hemorrhage"], pixels=pixels, in_chans=3,
                                     backbone="efficientnet_lite0")
    bundle = Bundle.load(model_pt, metrics, name="bench", version="1")
    return Inputs(Path(gate["manifest"]), Path(gate["audit"]), Path(gate["data"])), bundle, gate["deidentified"]


def bare(bundle, batches: list) -> float:
    """Seconds of softmax(model(x)) over the normalized batches."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            torch.softmax(bundle.model(x), 1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=150, help="copies of CT_small.dcm (plus the 48 demo slices)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the predict rule's default)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import pandas as pd
    import torch

    from haven.learn.data import normalize
    from haven.predict.stage import run

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="haven-bench-predict-") as tmp:
        inputs, bundle, n = build(Path(tmp), args.copies)
        rows = pd.read_csv(inputs.manifest, dtype=str, keep_default_na=False)
        samples = np.stack([bundle.sample(Path(inputs.data) / f, k) for f, k in zip(rows["file"], rows["kind"])])
        mean = torch.tensor(bundle.meta["mean"], dtype=torch.float32)
        std = torch.tensor(bundle.meta["std"], dtype=torch.float32)
        batches = [normalize(torch.from_numpy(samples[i:i + args.batch_size]), mean, std)
                   for i in range(0, len(samples), args.batch_size)]
        bare(bundle, batches[:1])  # warm-up (allocator, kernels)
        stage_s, bare_s = [], []
        for _ in range(args.repeat):  # interleaved: both see the same machine load
            t0 = time.perf_counter()
            table = run(inputs, bundle, batch_size=args.batch_size)
            stage_s.append(time.perf_counter() - t0)
            bare_s.append(bare(bundle, batches))
        assert (table["status"] == "ok").all() and len(table) == n
        # the stage's probabilities are the bare pass's (same samples, same network)
        with torch.inference_mode():
            p = torch.cat([torch.softmax(bundle.model(x), 1) for x in batches]).numpy()
        np.testing.assert_allclose(table[["p_normal", "p_hemorrhage"]].to_numpy(), p, atol=1e-5)
    stage_ips, bare_ips = n / min(stage_s), n / min(bare_s)
    result = {"files": int(n), "ct_small_copies": args.copies, "brain_ct_new_slices": int(n - args.copies),
              "model": "efficientnet_lite0, 64 px, 3 windows", "batch_size": args.batch_size,
              "threads": args.threads, "stage_images_per_s": round(stage_ips, 1),
              "bare_forward_images_per_s": round(bare_ips, 1), "ratio": round(stage_ips / bare_ips, 3),
              "goal": 0.8, "stage_seconds": [round(s, 3) for s in stage_s],
              "bare_seconds": [round(s, 3) for s in bare_s]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"predict on CPU ({args.threads} threads), {n} files ({args.copies} CT_small copies + "
          f"{n - args.copies} brain-ct-new slices), {result['model']}, batch {args.batch_size}")
    print(f"  predict stage : {stage_ips:8.1f} images/s (read, decode, preprocess, forward, rows)")
    print(f"  bare forward  : {bare_ips:8.1f} images/s (same batches, decoded and normalized beforehand)")
    print(f"  ratio         : {stage_ips / bare_ips:8.1%} (goal >= 80 %)")


if __name__ == "__main__":
    main()
