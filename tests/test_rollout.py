"""Sampling: the static-cache (and, on CUDA, compiled) decode loop samples what the dynamic one does.

The two caches run attention over different widths, i.e. matrix products of different shapes,
whose float rounding may differ; a sampled token sitting on a rounding boundary may then
differ too. So the runs are compared by agreement, not bit for bit: a cache or position bug
makes most tokens differ, rounding at most a rare one."""
import pytest
import torch

from engine import rollout
from engine.rollout import generate, left_pad
from engine.toy.models import build_toy_model, build_toy_tokenizer

TOK = build_toy_tokenizer()
PROMPTS = [[5, 6, 7, 8, 9], [4, 5], [7, 8, 9, 10, 11, 12, 13], [6]]


def sample(model, mode, *, seed=0, temperature=1.0, eos=True, n_new=30, device="cpu"):
    ids, mask = left_pad(PROMPTS, TOK.pad_token_id)
    g = torch.Generator(device=device).manual_seed(seed)
    return generate(model, ids.to(device), mask.to(device), max_new_tokens=n_new,
                    temperature=temperature, eos_id=TOK.eos_token_id if eos else -1,
                    pad_id=TOK.pad_token_id, generator=g, mode=mode)


def agreement(a, b):
    return (a.resp_ids == b.resp_ids).float().mean().item() if a.resp_ids.shape == b.resp_ids.shape else 0.0


def same_samples(a, b):
    """Token for token but for a rare rounding flip (which changes the rest of that row)."""
    return agreement(a, b) > 0.9 and (a.resp_mask == b.resp_mask).float().mean() > 0.9


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_static_cache_samples_the_same_tokens(temperature):
    model = build_toy_model(TOK, seed=1).eval()
    dyn = sample(model, "dynamic", temperature=temperature)
    for _ in range(2):  # the second call reuses (and must reset) the same cache
        st = sample(model, "static", temperature=temperature)
        assert same_samples(st, dyn)
    assert rollout._static[model]["shape"] == (len(PROMPTS), rollout.STATIC_BUCKET)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_preallocated_dynamic_cache_is_transformers_dynamic_cache(monkeypatch, temperature):
    """'dynamic' writes into a buffer allocated once (rollout._FilledPrefix) where transformers'
    DynamicCache concatenates: attention sees the same keys and values, so the same tokens,
    bit for bit, with left padding and rows ending early."""
    model = build_toy_model(TOK, seed=1).eval()
    ours = sample(model, "dynamic", temperature=temperature)
    monkeypatch.setattr(rollout, "_filled_prefix_cache", lambda model, capacity: None)
    theirs = sample(model, "dynamic", temperature=temperature)  # the model's DynamicCache
    assert torch.equal(ours.resp_ids, theirs.resp_ids)
    assert torch.equal(ours.resp_mask, theirs.resp_mask)
    if temperature:  # (the random model's greedy rows never sample <eos>)
        assert ours.resp_mask.sum(1).min() < ours.resp_mask.shape[1]  # some rows stopped early


def test_static_cache_follows_the_shape_and_stops_at_eos():
    model = build_toy_model(TOK, seed=2).eval()
    long = sample(model, "static", eos=False, n_new=rollout.STATIC_BUCKET + 5)  # a wider bucket
    assert long.resp_ids.shape[1] == rollout.STATIC_BUCKET + 5
    assert rollout._static[model]["shape"][1] == 2 * rollout.STATIC_BUCKET
    assert same_samples(long, sample(model, "dynamic", eos=False, n_new=rollout.STATIC_BUCKET + 5))
    # an untrained model samples nearly uniformly, so rows hit <eos> at different steps
    a, b = sample(model, "static", n_new=60), sample(model, "dynamic", n_new=60)
    assert same_samples(a, b)
    assert len(set(a.resp_mask.sum(1).tolist())) > 1 and not a.truncated.all()


def test_static_cache_under_bf16_autocast():
    """Keys arrive as float32 (Qwen3's k-norm) and values as bf16: the cache stores one dtype."""
    model = build_toy_model(TOK, seed=3).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dyn, st = sample(model, "dynamic"), sample(model, "static")
    assert agreement(dyn, st) > 0.95


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="generation mode"):
        sample(build_toy_model(TOK), "paged")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_generation_matches_dynamic_on_cuda(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_toy_model(TOK, seed=4).cuda().eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        dyn = sample(model, "dynamic", eos=False, device="cuda")
        runs = [sample(model, "compiled", eos=False, device="cuda") for _ in range(3)]
    # compiled kernels round differently, so a rare sampled token may differ; positions or
    # cache bugs would make most of them differ
    for c in runs:
        assert agreement(dyn, c) > (0.97 if dtype == torch.float32 else 0.9)
    assert torch.equal(runs[1].resp_ids, runs[2].resp_ids)  # graph replays are deterministic


def test_sampling_stops_at_every_eos_id_of_the_generation_config():
    """Qwen3's generation config lists several end ids; a row ends at the first of any (F15)."""
    model = build_toy_model(TOK, seed=5).eval()
    semi = TOK.convert_tokens_to_ids(";")
    model.generation_config.eos_token_id = [TOK.eos_token_id, semi]
    ids = rollout.stop_ids(model, TOK)
    assert ids == sorted({TOK.eos_token_id, semi})
    ro = sample(model, "dynamic", n_new=60)
    ro_ids = generate(model, *left_pad(PROMPTS, TOK.pad_token_id), max_new_tokens=60,
                      temperature=1.0, eos_id=ids, pad_id=TOK.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    stopped = 0
    for row, m in zip(ro_ids.resp_ids, ro_ids.resp_mask):
        kept = row[m.bool()].tolist()
        assert all(t not in ids for t in kept[:-1])  # no stop id before the last kept token
        stopped += kept[-1] in ids
    assert stopped >= 1 and not torch.equal(ro.resp_mask, ro_ids.resp_mask)


from hypothesis import given, strategies as st  # noqa: E402


@given(seed=st.integers(0, 10_000), top_p=st.floats(0.05, 0.999), top_k=st.integers(0, 12))
def test_sampling_never_leaves_the_nucleus(seed, top_p, top_k):
    """Kept tokens: the k likeliest, and among them the smallest set whose probability reaches
    top_p (docs/fidelity.md F5). Every removed token is less likely than every kept one, and a token
    drawn from the filtered distribution is always a kept one."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 12, generator=g) * 2.0
    kept = torch.isfinite(rollout.nucleus(z, top_k=top_k, top_p=top_p))
    base = torch.isfinite(rollout.nucleus(z, top_k=top_k))  # the top-k alone
    p = torch.softmax(z.masked_fill(~base, float("-inf")), -1)
    for row in range(3):
        pk, pr = p[row][kept[row]], p[row][base[row] & ~kept[row]]
        assert pk.sum() >= top_p - 1e-6 or pr.numel() == 0          # the nucleus reaches top_p
        assert pk.sum() - pk.min() < top_p + 1e-6                    # ... and is the smallest
        assert pr.numel() == 0 or pr.max() <= pk.min()               # the likeliest are kept
        assert kept[row].sum() <= (top_k or 12)
    draws = torch.multinomial(torch.softmax(rollout.nucleus(z, top_k=top_k, top_p=top_p), -1),
                              200, replacement=True, generator=g)
    assert kept.gather(1, draws).all()


def test_top_k_one_is_greedy():
    model = build_toy_model(TOK, seed=6).eval()
    ids, mask = left_pad(PROMPTS, TOK.pad_token_id)
    greedy = generate(model, ids, mask, max_new_tokens=20, temperature=0.0, eos_id=TOK.eos_token_id,
                      pad_id=TOK.pad_token_id)
    top1 = generate(model, ids, mask, max_new_tokens=20, temperature=1.0, eos_id=TOK.eos_token_id,
                    pad_id=TOK.pad_token_id, generator=torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(greedy.resp_ids, top1.resp_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_shared_prefill_samples_what_a_prefill_per_row_does(monkeypatch, temperature):
    """Rows repeating a prompt (groups of 3, interleaved) prefill it once and copy its cache
    rows out (rollout.distinct_prompts, _FilledPrefix.batch_select_indices): the same tokens
    as a prefill of every row, and the same random draws, as each row's logits are its own."""
    model = build_toy_model(TOK, seed=1).eval()
    ids, mask = left_pad(PROMPTS * 3, TOK.pad_token_id)
    prefill_rows = []
    model.get_decoder().layers[0].register_forward_pre_hook(
        lambda m, args: prefill_rows.append(args[0].shape[0]) if args[0].shape[1] > 1 else None)

    def run(share):
        monkeypatch.setattr(rollout, "SHARE_PROMPTS", share)
        return generate(model, ids, mask, max_new_tokens=25, temperature=temperature,
                        eos_id=TOK.eos_token_id, pad_id=TOK.pad_token_id,
                        generator=torch.Generator().manual_seed(0))
    shared, per_row = run(True), run(False)
    assert prefill_rows == [len(PROMPTS), 3 * len(PROMPTS)]
    assert same_samples(shared, per_row) and agreement(shared, per_row) > 0.98


@given(rows=st.lists(st.integers(0, 3), min_size=1, max_size=12), width=st.integers(1, 4))
def test_distinct_prompts_recovers_every_row(rows, width):
    """one_row picks a row of each distinct (ids, mask); inverse maps every row back to it."""
    ids = torch.tensor([[r] * width for r in rows])
    mask = torch.ones_like(ids)
    mask[:, 0] = torch.tensor([r % 2 for r in rows])  # (id, mask) pairs tell rows apart
    found = rollout.distinct_prompts(ids, mask)
    if len(set(rows)) == len(rows):
        assert found is None
        return
    one_row, inverse = found
    assert len(one_row) == len(set(rows))
    assert torch.equal(ids[one_row][inverse], ids) and torch.equal(mask[one_row][inverse], mask)


def test_sampling_in_passes_is_sampling_all_at_once():
    """--rollout-micro-batch: rows sampled two at a time and concatenated (prompts left-padded,
    responses right-padded to the widest part) are the rows of one greedy batch."""
    model = build_toy_model(TOK, seed=1).eval()

    def greedy(prompts):
        ids, mask = left_pad(prompts, TOK.pad_token_id)
        return generate(model, ids, mask, max_new_tokens=20, temperature=0.0,
                        eos_id=TOK.eos_token_id, pad_id=TOK.pad_token_id,
                        generator=torch.Generator().manual_seed(0), mode="dynamic")
    whole = greedy(PROMPTS)
    parts = [greedy(PROMPTS[:2]), greedy(PROMPTS[2:])]
    joined = rollout.concat_rollouts(parts, TOK.pad_token_id)
    assert joined.prompt_ids.shape == whole.prompt_ids.shape
    assert torch.equal(joined.prompt_mask, whole.prompt_mask)
    assert torch.equal(joined.prompt_ids, whole.prompt_ids)
    assert torch.equal(joined.truncated, whole.truncated)
    T = whole.resp_ids.shape[1]
    assert joined.resp_ids.shape[1] == T == max(p.resp_ids.shape[1] for p in parts)
    assert same_samples(joined, whole)
