"""Text-embedding cache: keys, bf16 size, hits/misses, concurrent writers, interrupted writes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from runner.data.store import stray_temp_files
from runner.data.text_cache import TextCache

CALLS: list[list[str]] = []


def fake_clip(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stand-in for CLIP-G: values seeded by the caption text."""
    CALLS.append(list(captions))
    hidden, pooled = [], []
    for c in captions:
        g = torch.Generator().manual_seed(int(hashlib.sha256(c.encode()).hexdigest()[:8], 16))
        hidden.append(torch.randn(77, 1280, generator=g))
        pooled.append(torch.randn(1, 1280, generator=g))
    return torch.stack(hidden), torch.stack(pooled)


def test_hits_misses_and_values(tmp_path: Path):
    CALLS.clear()
    cache = TextCache(tmp_path, "clip-g:abc")
    hidden, pooled = cache.get(["a cat", "a dog", "a cat"], fake_clip)
    assert (cache.hits, cache.misses) == (1, 2) and CALLS == [["a cat", "a dog"]]
    assert hidden.shape == (3, 77, 1280) and pooled.shape == (3, 1, 1280) and hidden.dtype == torch.bfloat16
    ref_h, ref_p = fake_clip(["a dog"])
    assert torch.equal(hidden[1], ref_h[0].bfloat16()) and torch.equal(pooled[1], ref_p[0].bfloat16())
    again = TextCache(tmp_path, "clip-g:abc")
    h2, _ = again.get(["a dog", ""], fake_clip)
    assert (again.hits, again.misses) == (1, 1) and torch.equal(h2[0], hidden[1])
    other = TextCache(tmp_path, "clip-g:other-weights")
    assert other.key("a cat") != cache.key("a cat") and not other.contains("a cat")
    # 77*1280 + 1280 bf16 values = 199,680 bytes of tensor data, plus a small header
    size = cache.path("a cat").stat().st_size
    assert 199_680 < size < 200_500


def test_precompute_batches(tmp_path: Path):
    CALLS.clear()
    cache = TextCache(tmp_path, "clip-g")
    assert cache.precompute([f"p{i}" for i in range(5)] + ["p0"], fake_clip, batch_size=2) == 5
    assert [len(c) for c in CALLS] == [2, 2, 1]
    assert cache.precompute(["p1", "p4"], fake_clip) == 0


def test_interrupted_and_corrupt_entries(tmp_path: Path):
    cache = TextCache(tmp_path, "clip-g")
    cache.get(["x"], fake_clip)
    path = cache.path("x")
    (path.parent / (path.name + ".tmp-abc123")).write_bytes(b"half a file")  # a writer killed mid-write
    path.write_bytes(b"\x00" * 10)  # a damaged entry (e.g. copied while incomplete)
    fresh = TextCache(tmp_path, "clip-g")
    hidden, _ = fresh.get(["x"], fake_clip)
    assert fresh.misses == 1 and torch.equal(hidden[0], fake_clip(["x"])[0][0].bfloat16())
    assert path.stat().st_size > 199_680  # replaced by a whole entry
    assert [p.name for p in stray_temp_files(tmp_path)] == [path.name + ".tmp-abc123"]


def test_concurrent_writers(tmp_path: Path):
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_text_cache import fake_clip
        from runner.data.text_cache import TextCache
        cache = TextCache({str(tmp_path)!r}, "clip-g")
        for _ in range(3):
            for i in range(0, 12, 3):
                cache.precompute([f"prompt {{j}}" for j in range(i, i + 3)], fake_clip)
            for p in cache.root.rglob("*.safetensors"):
                p.unlink(missing_ok=True)  # force both processes to rewrite the same keys
        cache.precompute([f"prompt {{j}}" for j in range(12)], fake_clip)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    cache = TextCache(tmp_path, "clip-g")
    hidden, pooled = cache.get(
        [f"prompt {j}" for j in range(12)], lambda c: (_ for _ in ()).throw(AssertionError(c))
    )
    ref_h, ref_p = fake_clip([f"prompt {j}" for j in range(12)])
    assert (
        cache.hits == 12 and torch.equal(hidden, ref_h.bfloat16()) and torch.equal(pooled, ref_p.bfloat16())
    )
    assert stray_temp_files(tmp_path) == []
