"""Tests for logit_cache/: codec fidelity, size, crash-safety, resume."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from logit_cache import (
    MANIFEST_NAME,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMeta,
    CacheMismatchError,
    LogitCache,
    LogitCacheWriter,
    PackLayout,
    _decode_range,
    cache_fidelity_kl,
    quantize_logprobs,
    reconstruct_logprobs,
    topk_from_logits,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small geometry for the crash/resume tests: 11 sequences at 2/shard -> 6 shards, last one partial.
RESUME_GEOMETRY = dict(vocab_size=1000, k=5, seq_len=8)
RESUME_TOTAL, RESUME_SPS = 11, 2


def make_meta(vocab_size: int, k: int, seq_len: int, teacher_hash: str = "teacher-a", **extra) -> CacheMeta:
    return CacheMeta(k=k, vocab_size=vocab_size, seq_len=seq_len, teacher_hash=teacher_hash,
                     tokenizer_hash="tok-1", data_hash="data-1", extra=dict(extra))


def fake_teacher(first: int, n: int, meta: CacheMeta) -> tuple[torch.Tensor, ...]:
    """Deterministic stand-in teacher: sequence i depends only on i, so skipping a prefix is exact.

    Returns input_ids [n,S], topk ids/logprobs [n,S,k], tail [n,S], full logits [n,S,V].
    """
    inputs, logits = [], []
    for i in range(first, first + n):
        g = torch.Generator().manual_seed(1234 + i)
        inputs.append(torch.randint(0, meta.vocab_size, (meta.seq_len,), generator=g))
        logits.append(torch.randn(meta.seq_len, meta.vocab_size, generator=g) * 3.0)
    full = torch.stack(logits)
    ids, lp, tail = topk_from_logits(full, meta.k)
    return torch.stack(inputs), ids, lp, tail, full


def write_sequences(root: Path, meta: CacheMeta, total: int, sps: int, batch: int,
                    delay_s: float = 0.0, finalize: bool = True, stop_after: int | None = None) -> LogitCacheWriter:
    """Drive a writer the way the pipeline does: resume at num_completed_sequences, add in batches."""
    w = LogitCacheWriter(root, meta, sequences_per_shard=sps)
    i = w.num_completed_sequences
    end = total if stop_after is None else min(total, stop_after)
    while i < end:
        n = min(batch, end - i)
        inp, ids, lp, tail, _ = fake_teacher(i, n, meta)
        w.add(inp, ids, lp, tail)
        i += n
        time.sleep(delay_s)  # lets the kill test land mid-run
    if finalize:
        w.finalize(total)
    return w


def shard_digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("shard_*"))}


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run; batch=2 differs from the resumed runs' batch=3 on purpose."""
    root = tmp_path_factory.mktemp("ref") / "cache"
    write_sequences(root, make_meta(**RESUME_GEOMETRY), RESUME_TOTAL, RESUME_SPS, batch=2)
    return root


def assert_matches_reference(root: Path, reference: Path) -> None:
    assert shard_digests(root) == shard_digests(reference)
    assert json.loads((root / MANIFEST_NAME).read_text())["shards"] == \
        json.loads((reference / MANIFEST_NAME).read_text())["shards"]
    assert not list(root.glob("*.tmp"))
    cache, ref = LogitCache(root), LogitCache(reference)
    for i in (0, len(ref) - 1):
        for key, value in ref[i].items():
            assert torch.equal(cache[i][key], value)


# ------------------------------------------------------------ codec ----

@pytest.mark.parametrize("vocab_size,k,logit_bytes", [
    (1000, 1, 3), (1000, 5, 3), (49152, 64, 3), (151936, 5, 3), (151936, 64, 3), (151936, 64, 4)])
def test_round_trip(tmp_path: Path, vocab_size: int, k: int, logit_bytes: int) -> None:
    meta = make_meta(vocab_size, k, seq_len=6)
    inp, ids, lp, tail, _ = fake_teacher(0, 3, meta)
    w = LogitCacheWriter(tmp_path, meta, sequences_per_shard=2, logit_bytes=logit_bytes)
    w.add(inp, ids, lp, tail)
    w.finalize(3)
    cache = LogitCache(tmp_path)
    assert len(cache) == 3 and cache.num_tokens() == 18
    layout = cache.layout
    if vocab_size > 65536:
        assert layout.id_bits == 18 and layout.input_id_bytes == 3
    got = [cache[i] for i in range(3)]
    assert torch.equal(torch.stack([g["input_ids"] for g in got]), inp)
    assert torch.equal(torch.stack([g["topk_ids"] for g in got]), ids)
    got_tail = torch.stack([g["tail_logmass"] for g in got])
    assert torch.equal(got_tail, tail.half().float())  # exact up to the float16 storage
    got_lp = torch.stack([g["topk_logprobs"] for g in got])
    assert got_lp.dtype == torch.float32 and got[0]["topk_ids"].dtype == torch.int64
    # Error bound: float16 rounding of top1 + half a quantization step of the stored range.
    top1 = lp.amax(-1)
    _, range_code, _ = quantize_logprobs(lp, layout.code_bits)
    bound = (top1.half().float() - top1).abs() + _decode_range(range_code) / (2 * ((1 << layout.code_bits) - 1))
    assert ((got_lp - lp).abs() <= bound.unsqueeze(-1) + 1e-5).all()
    assert torch.equal(cache[-1]["topk_ids"], got[-1]["topk_ids"])
    with pytest.raises(IndexError):
        cache[3]


def test_topk_from_logits() -> None:
    logits = (torch.randn(4, 7, 300) * 3).to(torch.bfloat16)
    ids, lp, tail = topk_from_logits(logits, 10)
    assert ids.shape == (4, 7, 10) and lp.dtype == torch.float32 and tail.shape == (4, 7)
    full = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(lp, full.gather(-1, ids), atol=1e-5)
    assert torch.allclose(tail, torch.log1p(-lp.exp().sum(-1)), atol=1e-4)
    _, _, none_left = topk_from_logits(logits, 300)
    assert torch.isneginf(none_left).all()


def test_bytes_per_logit(tmp_path: Path) -> None:
    for vocab_size, want in ((49152, 199.0), (151936, 200.0)):
        meta = make_meta(vocab_size, 64, seq_len=4)
        inp, ids, lp, tail, _ = fake_teacher(0, 2, meta)
        w = LogitCacheWriter(tmp_path / str(vocab_size), meta, sequences_per_shard=2)
        w.add(inp, ids, lp, tail)
        manifest = w.finalize(2)
        cache = LogitCache(tmp_path / str(vocab_size))
        payload = cache.nbytes() - manifest["header_bytes"] * len(manifest["shards"])
        assert payload / cache.num_tokens() == want  # 3 B/logit * 64 + per-token overhead
        assert PackLayout.for_vocab(vocab_size, 64).logit_bytes == 3
    assert payload / cache.num_tokens() - 3 * 64 <= 8


def test_fidelity_small_and_shrinking_with_k() -> None:
    torch.manual_seed(0)
    vocab = 49152
    full = torch.randn(64, vocab) * 3.0
    kls = []
    for k in (8, 64, 256):
        ids, lp, tail = topk_from_logits(full, k)
        exact = cache_fidelity_kl(full, ids, lp, tail)
        code_bits = PackLayout.for_vocab(vocab, k).code_bits
        deq = reconstruct_logprobs(*quantize_logprobs(lp, code_bits), code_bits)
        kl = cache_fidelity_kl(full, ids, deq, tail.half().float())
        assert abs(kl - exact) < 1e-4  # quantization adds almost nothing; truncation dominates
        kls.append(kl)
    assert kls[0] > kls[1] > kls[2] > 0
    ids, lp, tail = topk_from_logits(full[:, :1000], 1000)  # nothing truncated -> ~0
    deq = reconstruct_logprobs(*quantize_logprobs(lp, 14), 14)
    assert cache_fidelity_kl(full[:, :1000], ids, deq, tail) < 1e-5


# ------------------------------------------------------- durability ----

def test_resume_after_sigkill(tmp_path: Path, reference_cache: Path) -> None:
    root = tmp_path / "cache"
    args = [root, RESUME_GEOMETRY, RESUME_TOTAL, RESUME_SPS]
    script = ("import sys; from pathlib import Path\n"
              "from tests.test_logit_cache import make_meta, write_sequences\n"
              "root, geom, total, sps = eval(sys.argv[1])\n"
              "write_sequences(Path(root), make_meta(**geom), total, sps, batch=1, delay_s=0.15)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, repr([str(a) if isinstance(a, Path) else a
                                                                  for a in args])], env=env, cwd=REPO_ROOT)
    manifest_path = root / MANIFEST_NAME
    deadline = time.time() + 60
    try:
        while True:  # kill as soon as two shards are durable: mid-run by construction
            assert proc.poll() is None, "writer finished before it could be killed"
            assert time.time() < deadline, "writer never produced two shards"
            if manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) >= 2:
                break
            time.sleep(0.01)
        time.sleep(0.07)  # land somewhere inside the next add/shard write
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with pytest.raises(CacheIncompleteError):
        LogitCache(root)
    w = write_sequences(root, make_meta(**RESUME_GEOMETRY), RESUME_TOTAL, RESUME_SPS, batch=3, finalize=False)
    assert w.num_completed_sequences == RESUME_TOTAL - 1  # the partial last shard waits for finalize
    w.finalize(RESUME_TOTAL)
    assert_matches_reference(root, reference_cache)


def test_resume_discards_unlisted_shard_and_tmp_files(tmp_path: Path, reference_cache: Path) -> None:
    """The states a kill between tmp-write, rename and manifest-rewrite can leave behind."""
    root = tmp_path / "cache"
    meta = make_meta(**RESUME_GEOMETRY)
    w = write_sequences(root, meta, RESUME_TOTAL, RESUME_SPS, batch=3, finalize=False, stop_after=5)
    assert w.num_completed_sequences == 4
    # Shard renamed into place but manifest not yet updated; half-written tmp files.
    shutil.copy(reference_cache / "shard_000002.tkl", root / "shard_000002.tkl")
    (root / "shard_000003.tkl.tmp").write_bytes(b"partial")
    (root / "manifest.json.tmp").write_text("{")
    w = LogitCacheWriter(root, meta, sequences_per_shard=RESUME_SPS)
    assert w.num_completed_sequences == 4
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shard_000000.tkl", "shard_000001.tkl"]
    write_sequences(root, meta, RESUME_TOTAL, RESUME_SPS, batch=3)
    assert_matches_reference(root, reference_cache)


def test_corrupt_shard_is_refused_then_regenerated(tmp_path: Path, reference_cache: Path) -> None:
    root = tmp_path / "cache"
    shutil.copytree(reference_cache, root)
    shard = root / "shard_000001.tkl"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="shard_000001"):
        LogitCache(root)
    LogitCache(root, verify=False)  # size/header still fine: only the checksum can tell
    meta = make_meta(**RESUME_GEOMETRY)
    w = LogitCacheWriter(root, meta, sequences_per_shard=RESUME_SPS)
    assert w.num_completed_sequences == RESUME_SPS  # shard 1 and everything after it dropped
    with pytest.raises(CacheIncompleteError):
        LogitCache(root)
    write_sequences(root, meta, RESUME_TOTAL, RESUME_SPS, batch=3)
    assert_matches_reference(root, reference_cache)
    (root / "shard_000004.tkl").write_bytes(b"short")
    with pytest.raises(CacheCorruptError, match="shard_000004"):
        LogitCache(root, verify=False)


def test_mismatched_meta_is_refused(tmp_path: Path, reference_cache: Path) -> None:
    root = tmp_path / "cache"
    shutil.copytree(reference_cache, root)
    before = shard_digests(root)
    with pytest.raises(CacheMismatchError, match="teacher_hash"):
        LogitCacheWriter(root, make_meta(**RESUME_GEOMETRY, teacher_hash="teacher-b"), RESUME_SPS)
    with pytest.raises(CacheMismatchError, match="extra"):
        LogitCacheWriter(root, make_meta(**RESUME_GEOMETRY, temperature=2.0), RESUME_SPS)
    with pytest.raises(CacheMismatchError, match="seq_len"):
        LogitCacheWriter(root, make_meta(1000, 5, 16), RESUME_SPS)
    with pytest.raises(CacheMismatchError, match="sequences_per_shard"):
        LogitCacheWriter(root, make_meta(**RESUME_GEOMETRY), RESUME_SPS + 1)
    assert shard_digests(root) == before
    # Same meta on a complete cache: nothing to do, nothing rewritten.
    w = LogitCacheWriter(root, make_meta(**RESUME_GEOMETRY), RESUME_SPS)
    assert w.num_completed_sequences == RESUME_TOTAL
    assert w.finalize(RESUME_TOTAL)["complete"]
    assert_matches_reference(root, reference_cache)


def test_incomplete_and_misuse(tmp_path: Path) -> None:
    meta = make_meta(**RESUME_GEOMETRY)
    w = write_sequences(tmp_path, meta, RESUME_TOTAL, RESUME_SPS, batch=3, finalize=False, stop_after=5)
    with pytest.raises(CacheIncompleteError):
        LogitCache(tmp_path)
    with pytest.raises(ValueError, match="finalize"):
        w.finalize(RESUME_TOTAL)
    inp, ids, lp, tail, _ = fake_teacher(5, 1, meta)
    with pytest.raises(ValueError, match="topk_ids"):
        w.add(inp, ids[..., :4], lp, tail)
    with pytest.raises(ValueError, match="out of range"):
        w.add(inp, ids + meta.vocab_size, lp, tail)
    with pytest.raises(ValueError, match="NaN"):
        w.add(inp, ids, torch.full_like(lp, float("nan")), tail)


def test_reader_pickles_without_copying_shards(reference_cache: Path) -> None:
    cache = LogitCache(reference_cache)
    item = cache[3]
    blob = pickle.dumps(cache)  # what DataLoader does with spawn workers
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert all(torch.equal(clone[3][key], value) for key, value in item.items())


def test_truncated_shard_is_refused_then_regenerated(tmp_path: Path, reference_cache: Path) -> None:
    root = tmp_path / "cache"
    shutil.copytree(reference_cache, root)
    shard = root / "shard_000002.tkl"
    shard.write_bytes(shard.read_bytes()[:-7])  # e.g. a copy cut short
    with pytest.raises(CacheCorruptError, match="shard_000002"):
        LogitCache(root, verify=False)  # the size alone tells, without hashing
    write_sequences(root, make_meta(**RESUME_GEOMETRY), RESUME_TOTAL, RESUME_SPS, batch=3)
    assert_matches_reference(root, reference_cache)


def test_topk_from_hidden_is_topk_of_the_product_in_chunks() -> None:
    """The logits stage's chunked head: the same ids, log-probs and tail as the whole [N, V] product, with
    chunks of a few rows and an output matrix padded past the vocabulary (those rows never chosen)."""
    from logit_cache import topk_from_hidden, topk_from_logits

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(120, 16, generator=g)
    weight[100:] = 50.0  # padding rows that would win if they were counted
    whole = topk_from_logits(hidden @ weight[:100].T, 8)
    for chunk_bytes in (1, 5000, 1 << 30):  # one row per chunk, a few rows, all at once
        got = topk_from_hidden(hidden, weight, 8, 100, chunk_bytes=chunk_bytes)
        assert torch.equal(got[0], whole[0]) and int(got[0].max()) < 100
        assert torch.allclose(got[1], whole[1], atol=1e-6) and torch.allclose(got[2], whole[2], atol=1e-6)


def test_the_teacher_top_k_goes_through_the_chunked_head_only_for_a_plain_head() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM, MixtralConfig, MixtralForCausalLM

    from teachers.logit_generation import _teacher_topk
    from teachers.moe_layout import decoder_module
    from teachers.output_head import plain_head_problem

    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2)).eval()
    ids = torch.randint(0, 290, (2, 17))
    with torch.no_grad():
        full = _teacher_topk(moe, None, ids, 8, 290)
        chunked = _teacher_topk(moe, decoder_module(moe), ids, 8, 290)
    assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(full, chunked))
    assert plain_head_problem(moe) is None
    capped = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            final_logit_softcapping=30.0))
    assert plain_head_problem(capped) == "it rescales or soft-caps its logits"


@pytest.mark.parametrize("triton_on_cpu", [False, True])
def test_topk_select_equals_the_reference_with_ties_and_without_a_tail(triton_on_cpu: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """topk_select (top-k in the logits' dtype, one pass of row statistics, kernels.topk_tail: PyTorch and the
    Triton kernel through the interpreter) against topk_from_logits (float32 copies, scatter, two logsumexps):
    random float32 rows; bf16 rows quantised to a few values so that the k-th value is tied inside and outside
    the top-k; k == V (no tail)."""
    from kernels import topk_tail
    from kernels.interpreter import INTERPRETED
    from logit_cache import topk_select

    if triton_on_cpu and not INTERPRETED:
        pytest.skip("the kernel runs on CPU tensors only under Triton's interpreter (a machine without a GPU)")
    monkeypatch.setattr(topk_tail, "TRITON_ON_CPU", triton_on_cpu)
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randn(7, 300, generator=g) * 3, 10),
             ((torch.randn(6, 5000, generator=g) * 2).round().to(torch.bfloat16), 64),  # ties everywhere
             (torch.randn(3, 40, generator=g), 40)]
    for logits, k in cases:
        ids, lp, tail = topk_select(logits, k)
        rids, rlp, rtail = topk_from_logits(logits, k)
        assert ids.dtype == torch.int64 and lp.dtype == tail.dtype == torch.float32
        # ties may be broken differently: the same values at the chosen ids, the same log-probs and tail
        assert torch.equal(logits.float().gather(-1, ids), logits.float().gather(-1, rids))
        assert torch.allclose(lp, rlp, atol=1e-5) and torch.allclose(tail, rtail, atol=1e-5)
        if k == logits.shape[-1]:
            assert torch.isinf(tail).all() and (tail < 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_topk_gives_torch_topk_values_with_ties_and_a_partial_last_block(dtype: torch.dtype) -> None:
    """block_topk (block maxima, the k best blocks, a top-k over their entries) against torch.topk: the same
    sorted values, ids that point at them and never repeat; rows whose k-th value is tied across many blocks, a
    vocabulary that is not a multiple of the block (the last 17 columns hold a row's winners), a small row that
    goes straight to torch.topk."""
    from logit_cache import topk_select
    from logit_cache.topk import TOPK_BLOCK, block_topk

    g = torch.Generator().manual_seed(2)
    v = 600 * TOPK_BLOCK + 17
    x = (torch.randn(9, v, generator=g) * 3).to(dtype)
    x[1] = (x[1].float() / 3).round().to(dtype)  # a few distinct values: ties everywhere, the k-th among them
    x[2, -17:] = 100.0  # winners in the partial last block
    x[3, :] = 1.0  # every entry equal
    for k in (1, 32, 64, 150):
        vals, ids = block_topk(x, k)
        ref = torch.topk(x, k, dim=-1)
        assert ids.dtype == torch.int64 and torch.equal(vals, ref.values)
        assert torch.equal(x.gather(1, ids), vals)
        assert all(len(set(row.tolist())) == k for row in ids)
    assert set(block_topk(x, 17)[1][2].tolist()) == set(range(v - 17, v))
    small = torch.randn(4, 100, generator=g)
    assert torch.equal(block_topk(small, 8)[1], torch.topk(small, 8).indices)
    # Through topk_select: the same log-probs and tail as the float32 reference, ties and all.
    ids, lp, tail = topk_select(x, 64)
    rids, rlp, rtail = topk_from_logits(x, 64)
    assert torch.equal(x.float().gather(-1, ids), x.float().gather(-1, rids))
    assert torch.allclose(lp, rlp, atol=1e-5) and torch.allclose(tail, rtail, atol=1e-5)


def test_topk_in_one_read_by_blocks_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """topk_one_read (each block's max and logsumexp from kernels.topk_tail.block_stats, the k best blocks, a
    top-k over their entries, the tail as a sum of what is outside) against topk_from_logits: random float32
    rows, bf16 rows with ties everywhere, a row whose winners sit in the partial last block, a row with whole
    blocks of -inf (a masked vocabulary), k = 1, 8, 64. On a GPU, or here through the interpreter."""
    from kernels import topk_tail
    from kernels.interpreter import INTERPRETED
    from logit_cache.topk import TOPK_BLOCK, topk_one_read

    if not (INTERPRETED or torch.cuda.is_available()):
        pytest.skip("needs a GPU or Triton's interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(topk_tail, "TRITON_ON_CPU", True)
    g = torch.Generator().manual_seed(4)
    v = 300 * TOPK_BLOCK + 17
    rows = torch.randn(6, v, generator=g) * 3
    rows[2, -17:] += 40.0  # winners in the partial last block
    rows[3, 1000:9000] = float("-inf")  # whole blocks masked
    for logits in (rows, (rows / 3).round().to(torch.bfloat16)):
        logits = logits.to(dev)
        for k in (1, 8, 64):
            ids, lp, tail = topk_one_read(logits, k)
            rids, rlp, rtail = topk_from_logits(logits, k)
            assert ids.dtype == torch.int64 and lp.dtype == tail.dtype == torch.float32
            assert torch.equal(logits.float().gather(-1, ids), logits.float().gather(-1, rids))
            assert all(len(set(r.tolist())) == k for r in ids.cpu())
            assert torch.allclose(lp, rlp, atol=1e-5) and torch.allclose(tail, rtail, atol=1e-5)
    with pytest.raises(ValueError, match="at least k = 64 blocks"):
        topk_one_read(torch.randn(2, 63 * TOPK_BLOCK, device=dev), 64)
