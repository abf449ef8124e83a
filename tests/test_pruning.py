"""Pruning checked against an independent computation of importance and of the input norms."""

import warnings
import weakref

import pytest
import torch

from prilora import PriLoraConfig, get_prilora_model

from conftest import ParallelLayers

D_IN, D_OUT = 16, 8
SCALES = torch.tensor([0.01, 5.0, 0.2, 3.0, 0.05, 1.0, 8.0, 0.5, 0.02, 2.0, 0.3, 4.0, 0.1, 6.0, 0.7, 1.5])


def make(init_seed=0, **cfg):
    torch.manual_seed(init_seed)
    base = ParallelLayers(num_layers=3, d_in=D_IN, d_out=D_OUT)
    cfg.setdefault("target_modules", ["proj"])
    cfg.setdefault("r_start", 2)
    cfg.setdefault("r_end", 6)
    model, pruner = get_prilora_model(base, PriLoraConfig(**cfg))
    model.train()
    return model, pruner


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, D_IN, generator=g) * SCALES  # known per-feature scale


def train_step(model, pruner, x, lr=0.0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(x).pow(2).mean().backward()
    opt.step()
    pruner.step()
    opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def bottom_k_per_row(scores, k):
    """Independent reference: sort each row, take the k smallest positions."""
    zeros = set()
    for row in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: scores[row, j].item())
        zeros |= {(row, j) for j in order[:k]}
    return zeros


def zero_positions(w):
    return {tuple(ix) for ix in (w == 0).nonzero().tolist()}


def one_event(criterion="importance", scope="row", matrix="A", ratio=0.5, **extra):
    model, pruner = make(prune_criterion=criterion, prune_scope=scope, prune_matrix=matrix, prune_ratio=ratio,
                         prune_interval=1, prune_start=0, prune_end=1, **extra)
    before = {s.name: s.weight.detach().clone() for s in pruner.sites}
    x = batch(0)
    train_step(model, pruner, x, lr=0.0)  # lr 0: only pruning changes the weights
    return model, pruner, before, x


def test_importance_pruning_zeroes_bottom_k_of_abs_a_times_input_norm():
    model, pruner, before, x = one_event()
    norms = x.reshape(-1, D_IN).pow(2).sum(0).sqrt()  # L2 norm over all tokens of the batch
    for site in pruner.sites:
        a = before[site.name]
        torch.testing.assert_close(pruner.stats.norms(site.name), norms, rtol=1e-5, atol=0)
        expected = bottom_k_per_row(a.abs() * norms, int(0.5 * D_IN))
        assert zero_positions(site.lora_A) == expected
        # the kept weights are untouched
        keep = site.lora_A != 0
        torch.testing.assert_close(site.lora_A[keep], a[keep], rtol=0, atol=0)
    assert pruner.events == 1


def test_magnitude_and_random_differ_from_importance():
    _, imp, before, x = one_event("importance")
    _, mag, before_m, _ = one_event("magnitude")
    _, rnd, _, _ = one_event("random")
    k = int(0.5 * D_IN)
    for s_imp, s_mag, s_rnd in zip(imp.sites, mag.sites, rnd.sites):
        a = before_m[s_mag.name]
        assert zero_positions(s_mag.lora_A) == bottom_k_per_row(a.abs(), k)
        # the input scales span almost three orders of magnitude: the criteria must disagree
        assert zero_positions(s_mag.lora_A) != zero_positions(s_imp.lora_A)
        assert zero_positions(s_rnd.lora_A) not in (zero_positions(s_imp.lora_A), zero_positions(s_mag.lora_A))
        assert ((s_rnd.lora_A == 0).sum(1) == k).all()
    # importance favours high-norm features: they survive far more often than under magnitude
    high = SCALES > 1.0
    kept_high_imp = sum(int((s.lora_A[:, high] != 0).sum()) for s in imp.sites)
    kept_high_mag = sum(int((s.lora_A[:, high] != 0).sum()) for s in mag.sites)
    assert kept_high_imp > kept_high_mag


def test_random_criterion_is_seeded():
    _, a, _, _ = one_event("random", seed=3)
    _, b, _, _ = one_event("random", seed=3)
    _, c, _, _ = one_event("random", seed=4)
    za = [zero_positions(s.lora_A) for s in a.sites]
    assert za == [zero_positions(s.lora_A) for s in b.sites]
    assert za != [zero_positions(s.lora_A) for s in c.sites]


def test_matrix_scope_prunes_bottom_k_of_whole_matrix():
    _, pruner, before, x = one_event(scope="matrix", ratio=0.25)
    norms = x.reshape(-1, D_IN).pow(2).sum(0).sqrt()
    for site in pruner.sites:
        scores = before[site.name].abs() * norms
        k = int(0.25 * scores.numel())
        flat = sorted(range(scores.numel()), key=lambda i: scores.flatten()[i].item())[:k]
        expected = {divmod(i, D_IN) for i in flat}
        assert zero_positions(site.lora_A) == expected


def test_pruning_b_uses_norms_of_a_outputs():
    # B starts at zero in LoRA; random init makes its importance well defined for the test.
    _, pruner, before, x = one_event(matrix="B", lora_kwargs={"init_lora_weights": False})
    for site in pruner.sites:
        a = site.lora_A.detach()
        h = x.reshape(-1, D_IN) @ a.T  # input of B = output of A (no dropout)
        norms = h.pow(2).sum(0).sqrt()
        torch.testing.assert_close(pruner.stats.norms(site.name), norms, rtol=1e-4, atol=1e-6)
        r = a.shape[0]
        assert zero_positions(site.lora_B) == bottom_k_per_row(before[site.name].abs() * norms, int(0.5 * r))
        assert int((site.lora_A == 0).sum()) == 0


def test_ema_over_steps_matches_independent_formula():
    beta = 0.8
    model, pruner = make(ema_beta=beta, prune_interval=100, prune_start=100, prune_end=100)
    xs = [batch(i) for i in range(3)]
    for x in xs:
        train_step(model, pruner, x)
    ema = torch.zeros(D_IN, dtype=torch.float64)
    for x in xs:
        ema = beta * ema + (1 - beta) * x.double().reshape(-1, D_IN).pow(2).sum(0).sqrt()
    ema = ema / (1 - beta**3)
    for site in pruner.sites:
        torch.testing.assert_close(pruner.stats.norms(site.name).double(), ema, rtol=1e-5, atol=0)


def test_gradient_accumulation_sums_micro_batches():
    # Two micro-batches then one optimizer step == one step on the concatenated batch.
    model_a, pa = make(prune_interval=100, prune_start=100, prune_end=100)
    model_b, pb = make(prune_interval=100, prune_start=100, prune_end=100)
    x = batch(0)
    model_a(x[:2]).sum()
    model_a(x[2:]).sum()
    pa.step()
    model_b(x).sum()
    pb.step()
    for sa, sb in zip(pa.sites, pb.sites):
        torch.testing.assert_close(pa.stats.norms(sa.name), pb.stats.norms(sb.name), rtol=1e-5, atol=0)


def test_no_statistics_in_eval_mode():
    model, pruner = make(prune_interval=100, prune_start=100, prune_end=100)
    model.eval()
    model(batch(0))
    assert all(float(acc.abs().sum()) == 0.0 for acc in pruner.stats.accs.values())
    model.train()
    model(batch(0))
    assert all(float(acc.abs().sum()) > 0.0 for acc in pruner.stats.accs.values())


def test_no_hooks_when_criterion_needs_no_statistics():
    for criterion in ("magnitude", "random", "none"):
        model, pruner = make(prune_criterion=criterion)
        assert pruner.stats.accs == {}
        assert all(not s.stats_module._forward_pre_hooks for s in pruner.sites)


def test_event_schedule():
    _, pruner = make(prune_interval=7, prune_start=10, prune_end=0.9, total_steps=100)
    events = [s for s in range(1, 101) if pruner.is_event(s)]
    assert events == [10, 17, 24, 31, 38, 45, 52, 59, 66, 73, 80, 87, 90]


def test_zeroed_weights_regrow_between_events_and_final_mask_is_held():
    model, pruner = make(prune_interval=3, prune_start=0, prune_end=6)
    for step in range(1, 12):
        train_step(model, pruner, batch(step), lr=1e-3)
        a = pruner.sites[-1].lora_A
        zeros = zero_positions(a)
        if step == 3:
            after_first = zeros
            assert len(after_first) == a.shape[0] * int(0.5 * D_IN)
        if step == 4:  # not an event: SGD moved the pruned weights off zero
            assert not zeros & after_first
        if step == 6:
            final = zeros
            final_values = a.detach().clone()
        if step > 6:  # held: same positions, other weights still train
            assert zeros == final
            assert not torch.equal(a.detach(), final_values)
    assert pruner.events == 2
    # The history records each event's step, the zeros left from before (all regrew: none) and after.
    assert pruner.history == [[3, 0.0, 0.5], [6, 0.0, 0.5]]
    state = pruner.state_dict()
    _, fresh = make(prune_interval=3, prune_start=0, prune_end=6)
    fresh.load_state_dict(state)
    assert fresh.history == pruner.history


def test_plain_loop_needs_total_steps_for_fractional_window():
    model, pruner = make(prune_end=0.9)
    model(batch(0)).sum().backward()
    with pytest.raises(ValueError, match="prune_end=0.9 is a fraction of training but the number of optimizer steps is unknown"):
        pruner.step()
    pruner.set_total_steps(10)
    pruner.step()  # fine now


def test_finalize_prunes_when_training_stopped_early():
    model, pruner = make(prune_interval=5, prune_start=0, prune_end=50)
    for step in range(7):
        train_step(model, pruner, batch(step), lr=1e-3)
    assert pruner.sparsity()["A"] < 0.5
    with pytest.warns(RuntimeWarning, match="before the last pruning event"):
        pruner.finalize()
    assert pruner.sparsity()["A"] == 0.5


def test_sparsity_report():
    _, pruner, _, _ = one_event(ratio=0.25)
    report = pruner.sparsity()
    assert report["A"] == 0.25  # int(0.25 * 16) = 4 of 16 in every row
    assert report["B"] == 1.0  # B is zero-initialised and lr was 0
    assert set(report["per_layer"]) == {0, 1, 2}
    assert all(v["A"] == 0.25 for v in report["per_module"].values())


def test_non_finite_batch_does_not_poison_the_ema():
    model, pruner = make(prune_interval=2, prune_start=0, prune_end=2)
    train_step(model, pruner, batch(0))
    good = {s.name: pruner.stats.emas[s.name].clone() for s in pruner.sites}
    bad = batch(1)
    bad[0, 0, 3] = float("inf")
    with torch.no_grad():
        model(bad)
    pruner.stats.update()  # the step with the inf batch
    for s in pruner.sites:
        assert torch.equal(pruner.stats.emas[s.name], good[s.name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an event reads nothing back from the device: no warning there
        pruner.prune()
    with pytest.warns(RuntimeWarning, match="skipped the input norms of 1 optimizer step"):
        pruner.finalize()  # where the host reads anyway (and checkpoints: state_dict)


def test_ema_update_skips_only_the_modules_whose_sums_are_not_finite():
    _, pruner = make()
    stats = pruner.stats
    names = list(stats.accs)
    assert len(names) == 3
    g = torch.Generator().manual_seed(0)
    for rnd in range(2):  # the second update starts from a non-zero EMA
        before = {n: stats.emas[n].clone() for n in names}
        sums = {n: torch.rand(D_IN, generator=g) * (i + 1) for i, n in enumerate(names)}  # a step's norms
        for n in names:
            stats.accs[n].copy_(sums[n])
        if rnd == 1:
            stats.accs[names[0]][3] = float("nan")
            stats.accs[names[2]][-1] = float("inf")
        stats.update()
        for i, n in enumerate(names):
            if rnd == 1 and i != 1:
                assert torch.equal(stats.emas[n], before[n])
            else:  # EMA of the norms, computed here element by element
                expected = torch.tensor([stats.beta * float(e) + (1 - stats.beta) * float(a)
                                         for e, a in zip(before[n], sums[n])])
                torch.testing.assert_close(stats.emas[n], expected)
            assert not stats.accs[n].any()
    assert stats.skipped_steps() == 1  # one step skipped, however many modules it hit
    with pytest.raises(ValueError, match="already tracks the input of"):
        stats.track(names[0], pruner.sites[0].stats_module, D_IN, torch.device("cpu"))


def test_ema_update_runs_as_many_operations_for_many_modules_as_for_few():
    """On a GPU a step is bound by its number of operations: the update must not loop over modules."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for layers in (2, 12):
        torch.manual_seed(0)
        model, pruner = get_prilora_model(ParallelLayers(num_layers=layers, d_in=D_IN, d_out=D_OUT),
                                          PriLoraConfig(target_modules=["proj"], r_start=2, r_end=6))
        assert len(pruner.stats.accs) == layers
        Count.n = 0
        with Count():
            pruner.stats.update()
        counts.append(Count.n)
    assert counts[0] == counts[1] and counts[0] < 20


def test_statistics_follow_a_model_moved_after_wrapping():
    # The Trainer moves the model to its device (and users cast it) after get_prilora_model.
    model, pruner = make(prune_interval=1, prune_start=0, prune_end=1)
    model.double()
    x = batch(0).double()
    train_step(model, pruner, x)
    norms = x.reshape(-1, D_IN).pow(2).sum(0).sqrt()
    for site in pruner.sites:
        torch.testing.assert_close(pruner.stats.norms(site.name).double(), norms, rtol=1e-5, atol=0)
        assert site.lora_A.dtype == torch.float64
        assert ((site.lora_A == 0).sum(1) == D_IN // 2).all()


def test_keyword_input_is_read():
    model, pruner = make(prune_interval=100, prune_start=100, prune_end=100)
    x = batch(0)
    for layer in model.base_model.model.layers:
        layer["proj"](x=x)
    pruner.step()
    norms = x.reshape(-1, D_IN).pow(2).sum(0).sqrt()
    for site in pruner.sites:
        torch.testing.assert_close(pruner.stats.norms(site.name), norms, rtol=1e-5, atol=0)


def test_remove_detaches_hooks():
    model, pruner = make()
    pruner.remove()
    model(batch(0))
    assert all(float(acc.abs().sum()) == 0.0 for acc in pruner.stats.accs.values())


def test_finalize_repairs_weights_that_left_the_final_mask():
    model, pruner = make(prune_interval=2, prune_start=0, prune_end=4)
    for step in range(6):
        train_step(model, pruner, batch(step), lr=1e-3)
    pruner.finalize()  # everything in order: no warning, nothing changes
    site = pruner.sites[0]
    with torch.no_grad():
        site.lora_A[site.lora_A == 0] = 0.5  # as if an earlier checkpoint had been loaded
    assert pruner.sparsity()["A"] < 0.5
    with pytest.warns(RuntimeWarning, match="do not follow the final mask"):
        pruner.finalize()
    assert pruner.sparsity()["A"] == 0.5


def test_bf16_autocast_keeps_statistics_finite_and_sparsity_exact():
    model, pruner = make(prune_interval=2, prune_start=0, prune_end=4)
    for step in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch(step) * 1e3).float().pow(2).mean()  # large activations: fp16 sums would overflow
        loss.backward()
        pruner.step()
        model.zero_grad()
    for site in pruner.sites:
        assert torch.isfinite(pruner.stats.norms(site.name)).all()
        assert pruner.stats.emas[site.name].dtype == torch.float32
    assert pruner.sparsity()["A"] == 0.5


def test_fp16_inputs_whose_squares_overflow_fp16():
    model, pruner = make(prune_interval=100, prune_start=100, prune_end=100)
    model.half()
    x = (batch(0) * 100).half()  # entries up to ~2000: squares far above fp16's 65504
    with torch.no_grad():
        model(x)
    pruner.step()
    norms = x.double().reshape(-1, D_IN).pow(2).sum(0).sqrt()
    for site in pruner.sites:
        torch.testing.assert_close(pruner.stats.norms(site.name).double(), norms, rtol=1e-5, atol=0)


def test_shared_input_is_squared_once_and_not_kept_alive(monkeypatch):
    import prilora.statistics

    monkeypatch.setattr(prilora.statistics, "CPU_SPLIT_REDUCTION", False)  # the one reduction a GPU runs
    model, pruner = make(prune_interval=100, prune_start=100, prune_end=100)
    reduced = []
    norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda t, *a, **k: reduced.append(t.shape) or norm(t, *a, **k))
    x = batch(0)
    out = model(x)
    assert reduced == [x.shape]  # three adapted layers read the same tensor: one reduction
    alive = weakref.ref(x)
    del x, out
    assert alive() is None  # the statistics keep no activation alive (a strong reference cost 24 MiB on MiniLM)
    pruner.step()
    assert all(float(acc.abs().sum()) == 0.0 for acc in pruner.stats.accs.values())  # folded into the EMA


def test_event_history_counts_zeros_of_every_matrix_and_reads_nothing_back(monkeypatch):
    """The "before" fraction counts the zeros left in every pruned matrix (checked against a count made
    here), and an event reads nothing back to the host: the history is read when someone asks."""
    model, pruner = make(prune_interval=3, prune_start=5, prune_end=6)
    train_step(model, pruner, batch(0))  # input norms for the importance scores; no event yet
    assert len(pruner.sites) == 3 and pruner.history == []
    with torch.no_grad():
        for i, site in enumerate(pruner.sites):  # 1, 2 and 3 zeros in rows of different matrices
            site.weight[0, : i + 1] = 0.0
    expected = sum(int((s.weight == 0).sum()) for s in pruner.sites) / sum(s.weight.numel() for s in pruner.sites)
    assert expected > 0
    reads = []
    for method in ("__int__", "__float__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda t, *a, _o=original, _m=method: reads.append(_m) or _o(t, *a))
    pruner.prune()
    monkeypatch.undo()
    assert reads == []
    assert pruner.history == [[1, pytest.approx(expected), 0.5]]
