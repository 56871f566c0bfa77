"""``probssl bench eval-memory``: peak memory of evaluating N embeddings × S samples.

The evaluation keeps one feature bank per split, [S, N, D] float32, because every protocol reads
it (kNN and the probes per sample, calibration, OOD, retrieval). Everything else must stay bounded:
features are written into a preallocated bank batch by batch, kNN compares ``chunk_size`` queries
at a time, probes are fitted one sample at a time. This benchmark proves it by measuring the peak
resident memory of a child process running feature extraction and the marginal kNN (and, with
``probe=True``, the per-sample linear probes) on synthetic images, against the size of the banks:
the overhead should not grow with N × N or S × N × N.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
import warnings
from typing import Any

import torch

from probssl.embedding import Embedding
from probssl.eval.features import extract_features
from probssl.eval.knn import knn_predict_marginal
from probssl.eval.suite import MarginalProbe


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _measure(items: int, test_items: int, samples: int, dim: int, probe: bool, queue: Any) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    images = torch.randint(0, 256, (items, 1, 28, 28), dtype=torch.uint8)
    test_images = images[:test_items].clone()
    labels = torch.randint(0, 10, (items,))
    projection = torch.randn(784, dim) / 28.0
    noise_scale = torch.linspace(0.05, 0.2, dim)

    def embed(x: torch.Tensor) -> Embedding:
        mean = x.flatten(1) @ projection
        gen = torch.Generator().manual_seed(int(x[0].sum()))  # fixed per batch: reproducible draws
        noise = torch.randn((samples, *mean.shape), generator=gen) * noise_scale
        draws = mean + noise
        spread = draws.std(0).sum(-1) if samples > 1 else torch.zeros(mean.shape[0])
        return Embedding(mean=mean, samples=draws, uncertainty=spread)

    baseline = _rss_mib()
    start = time.perf_counter()
    preprocess = lambda x: x.float() / 255.0  # noqa: E731
    train = extract_features(embed, images, labels, preprocess, batch_size=1024)
    test = extract_features(embed, test_images, labels[:test_items], preprocess, batch_size=1024)
    after_features = _peak_mib()
    knn_predict_marginal(train.draws, train.labels, test.draws, 10, k=20)
    if probe:  # memory, not an optimum, is measured: 50 iterations on random labels, unconverged by design
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="a linear probe did not converge")
            MarginalProbe.fit(train, 10, max_iter=50).sample_probs(test.draws)
    bank_mib = (train.draws.numel() + test.draws.numel()) * 4 / 2**20
    queue.put(
        {
            "items": items,
            "test_items": test_items,
            "samples": samples,
            "dim": dim,
            "probe": probe,
            "bank_mib": bank_mib,
            "images_mib": images.numel() * 2 / 2**20,  # train images and the test copy (uint8)
            "baseline_rss_mib": baseline,
            "peak_after_features_mib": after_features,
            "peak_rss_mib": _peak_mib(),
            "overhead_mib": _peak_mib() - baseline - bank_mib,
            "seconds": time.perf_counter() - start,
        }
    )


def measure_eval_memory(
    items: int = 100_000, test_items: int = 10_000, samples: int = 32, dim: int = 128, probe: bool = False
) -> dict[str, Any]:
    """Run one measurement in a fresh process (a clean peak) and return its numbers."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(items, test_items, samples, dim, probe, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the measurement process failed with exit code {proc.exitcode}")
    return result


def eval_memory_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["N train", "N test", "S", "D", "probes", "banks MiB", "peak RSS MiB", "overhead MiB", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['items']:,}",
            f"{r['test_items']:,}",
            str(r["samples"]),
            str(r["dim"]),
            "yes" if r["probe"] else "no",
            f"{r['bank_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['overhead_mib']:.0f}",
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Overhead = peak RSS − RSS once the synthetic uint8 images are loaded − the two [S, N, D] float32 "
        "banks: the batches in flight, the kNN chunks and (with probes) the per-sample probe fits."
    )
    return "\n".join(lines)
