"""GPU check: one table of what a CUDA machine does with the model (``make gpu-check``; ``--dry`` on the CPU).

Rows:
- parity: CUDA float32 outputs against the golden data of the official code (tests/fixtures/parity), with
  the CPU parity test's tolerance (relative error <= 1e-4; label maps and caption ids exact);
- autocast: bf16 and fp16 against float32 on the same device (label-map agreement, lowest image-embedding
  cosine, equal caption ids);
- speed: Focal-T and Focal-L (random weights: speed does not depend on them) images/s of ``encode`` at batch
  1, 8 and 32 (one padded-size group, 512x672 images) and the peak GPU memory of each;
- FAISS on the GPU when faiss is importable and sees a GPU (exact inner-product search against the CPU's).

Needs only torch with CUDA, numpy and pillow, plus the small wheels xdecoder imports (ftfy, wcwidth,
tokenizers, safetensors), carried when the machine lacks them; the first row says what is missing. Runs in
a few minutes on one GPU; ``--dry`` runs the same code on the CPU with the parity model at tiny sizes, so
the check cannot rot (tests/test_gpu_check.py). Exit status 1 when a parity or agreement row fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "fixtures" / "parity"
NEEDED = ("numpy", "PIL", "ftfy", "tokenizers", "safetensors")
TOL = 1e-4
Row = tuple[str, str, str, bool | None]  # check, measured, bound, passed (None: information)


def _rel(actual: object, expected: object) -> float:
    import numpy as np

    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))


def parity_rows(device: str, dtypes: list[str]) -> list[Row]:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from xdecoder import Predictor, build_model, load_checkpoint
    from xdecoder.predictor import PredictorSettings

    golden = dict(np.load(PARITY / "golden.npz"))
    meta = json.loads((PARITY / "golden_meta.json").read_text())
    torch.manual_seed(0)
    model = build_model("parity")
    load_checkpoint(model, PARITY / "reduced_weights.safetensors")
    image_a, image_b = Image.open(PARITY / "imageA_320x480.png"), Image.open(PARITY / "imageB_240x320.png")
    names = list(meta["class_names"])

    def outputs(predictor: Predictor) -> dict[str, np.ndarray]:
        predictor.settings.short_side = 240
        sem = predictor.semantic(predictor.encode(image_a), names, return_scores=True)[0]
        predictor.settings.short_side = 224
        both = predictor.encode([image_a, image_b], pad_together=True)
        return {"scores": np.asarray(sem.scores), "labels": sem.label_map,
                "decoder": torch.stack([e.embeddings[-1] for e in both]).cpu().numpy(),
                "vectors": predictor.image_embeddings(both),
                "caption": np.array(predictor.caption_ids(predictor.encode(image_a))[0])}

    fp32 = outputs(Predictor(model, device=device, settings=PredictorSettings(), autocast=False))
    rows: list[Row] = []
    for name, ours, key in (("semantic scores", fp32["scores"], "seg_sem_seg"),
                            ("retrieval decoder embeddings", fp32["decoder"], "ret_image_embeds_decoder")):
        err = _rel(ours, golden[key])
        rows.append((f"parity {device} fp32: {name}", f"rel err {err:.1e}", f"<= {TOL:.0e}", err <= TOL))
    same = float((fp32["labels"] == golden["seg_sem_seg_argmax"]).mean())
    rows.append((f"parity {device} fp32: semantic label map", f"{same:.4%} equal", "100%", same == 1.0))
    equal = fp32["caption"].tolist() == golden["cap_token_ids"].tolist()
    rows.append((f"parity {device} fp32: caption ids", "equal" if equal else "differ", "equal", equal))
    for dtype in dtypes:
        low = outputs(Predictor(model, device=device, settings=PredictorSettings(), autocast=True,
                                autocast_dtype=getattr(torch, dtype)))
        agree = float((low["labels"] == fp32["labels"]).mean())
        cosine = float(np.min(np.sum(low["vectors"] * fp32["vectors"], axis=1)))
        ids = float(np.mean(low["caption"] == fp32["caption"]))
        rows += [(f"autocast {dtype} vs fp32: label map", f"{agree:.2%} agree", ">= 99%", agree >= 0.99),
                 (f"autocast {dtype} vs fp32: image embedding", f"min cosine {cosine:.4f}", ">= 0.99",
                  cosine >= 0.99),
                 (f"autocast {dtype} vs fp32: caption ids", f"{ids:.0%} equal", "information", None)]
    return rows


def speed_rows(device: str, configs: list[str], batches: list[int], size: tuple[int, int], runs: int) -> list[Row]:
    import numpy as np
    import torch

    from xdecoder import Predictor, build_model
    from xdecoder.predictor import PredictorSettings

    rows: list[Row] = []
    cuda = device.startswith("cuda")
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    for name in configs:
        torch.manual_seed(0)
        predictor = Predictor(build_model(name), device=device, settings=PredictorSettings(short_side=min(size)))
        rng = np.random.default_rng(0)
        for batch in batches:
            images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(batch)]
            try:
                predictor.encode(images)  # warm-up: kernels chosen, memory pools grown
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(runs):
                    predictor.encode(images)
                sync()
                rate = batch * runs / (time.perf_counter() - start)
                peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
                rows.append((f"speed {name} batch {batch} ({size[0]}x{size[1]})", f"{rate:.2f} images/s{peak}",
                             "information", None))
            except torch.cuda.OutOfMemoryError:
                rows.append((f"speed {name} batch {batch}", "out of GPU memory", "information", None))
                torch.cuda.empty_cache()
        del predictor
    return rows


def faiss_rows(use_gpu: bool) -> list[Row]:
    if importlib.util.find_spec("faiss") is None:
        return [("faiss", "not importable here", "information", None)]
    import faiss
    import numpy as np

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not use_gpu or gpus == 0:
        return [("faiss", f"importable, {gpus} GPUs seen: GPU index not checked", "information", None)]
    rng = np.random.default_rng(0)
    base = rng.normal(size=(100_000, 512)).astype(np.float32)
    queries = rng.normal(size=(100, 512)).astype(np.float32)
    cpu = faiss.IndexFlatIP(512)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(512))
    gpu.add(base)
    start = time.perf_counter()
    _, found = gpu.search(queries, 10)
    seconds = time.perf_counter() - start
    _, expected = cpu.search(queries, 10)
    same = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected, strict=True)]))
    return [("faiss GPU flat IP, 100k x 512, top 10", f"{same:.1%} of CPU hits, {100 / seconds:.0f} queries/s",
             ">= 99%", same >= 0.99)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU, parity model, tiny sizes")
    args = parser.parse_args(argv)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    rows: list[Row] = [("python modules", "missing: " + ", ".join(missing) if missing else "all present",
                        "none missing", not missing)]
    if not missing:
        import torch

        sys.path.insert(0, str(ROOT))
        if args.dry:
            device, dtypes = "cpu", ["bfloat16"]
            configs, batches, size, runs = ["parity"], [1, 2], (64, 96), 1
        else:
            if not torch.cuda.is_available():
                print("no CUDA device: run with --dry for the CPU rehearsal", file=sys.stderr)
                return 2
            device, dtypes = "cuda", ["bfloat16", "float16"]
            configs, batches, size, runs = ["focalt", "focall"], [1, 8, 32], (512, 672), 3
            rows.append(("device", torch.cuda.get_device_name(0), "information", None))
        started = time.perf_counter()
        rows += parity_rows(device, dtypes)
        rows += speed_rows(device, configs, batches, size, runs)
        rows += faiss_rows(use_gpu=not args.dry)
        rows.append(("wall time", f"{time.perf_counter() - started:.0f} s", "<= 480 s", None))
    width = max(len(r[0]) for r in rows)
    print(f"| {'check':<{width}} | measured | bound | result |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for check, measured, bound, passed in rows:
        print(f"| {check:<{width}} | {measured} | {bound} | {'-' if passed is None else 'ok' if passed else 'FAIL'} |")
    return 1 if any(r[3] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
