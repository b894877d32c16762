"""Vocabulary-parallel cross-entropy (issue 12, part 4): shards of the classes.

NumPy (lse_partial -> lse_combine -> shard_cross_entropy[_with_grad]) against torch in
float64 on the whole rows (torch_lm_truth, the tolerances of tests/test_transform.py:
the shard's kernel does the same arithmetic as the unsharded one, only with its sums
split and merged in double), and against the unsharded fastce call: the loss to
4 ulp (the merged state's double rounding differs from the unsharded one's, then one
rounding to the dtype), the gradient to 4 ulp of its scale. Then for real over
torch.distributed: 2 and 4 ranks on 127.0.0.1 (gloo), spawned with a bounded time,
each rank's loss and gradient against the single-process result; errors and a rank
that dies.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import fastce
from _grad_helpers import (seed_of, assert_grad_close, check_lm, grad_scale, logit_bound, make_case,
                           rtol_for, torch_lm_truth, torch_single_thread,  # noqa: F401
                           transformed)
from _vocab_parallel_worker import full_inputs

torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))

SPLITS = {"one": lambda C: [C], "two": lambda C: [C // 3, C - C // 3],
          "ragged": lambda C: [1, C // 2 - 1, C - C // 2 - 1, 1]}
OPTIONS = [dict(), dict(weight=True, label_smoothing=0.1), dict(reduction="none"),
           dict(ignore=True, reduction="sum", label_smoothing=0.2),
           dict(z_loss=1e-3, weight=True, softcap=6.0, logit_scale=1.5),
           dict(ignore=True, logit_scale=0.5, reduction="none", grad_output=True)]


def shard_bounds(widths):
    starts = np.concatenate([[0], np.cumsum(widths)])
    return list(zip(starts[:-1].tolist(), starts[1:].tolist()))


def case(shape, dtype, opt, seed):
    rng = np.random.default_rng(seed)
    o = dict(OPTIONS[opt])
    x, t = make_case(rng, shape, dtype, ignore=0.3 if o.pop("ignore", False) else None,
                     scale=4.0)
    if o.pop("weight", False):
        o["weight"] = (rng.random(shape[1]) + 0.5).astype(dtype)
    if o.pop("grad_output", False):
        o["grad_output"] = rng.standard_normal(shape[0])
    return x, t, o


def sharded(x, t, widths, want_lse=True, **kw):
    """(loss, grad, z part, lse) of the shards' calls: the state of each, combined, then
    each shard's loss (all equal: returned is shard 0's, the others checked equal)
    and gradient, concatenated."""
    C = x.shape[1]
    state_kw = {k: kw[k] for k in ("weight", "ignore_index", "label_smoothing",
                                   "logit_scale", "softcap") if k in kw}
    parts = [fastce.lse_partial(x[:, a:b], t, class_start=a, num_classes=C, **state_kw)
             for a, b in shard_bounds(widths)]
    st = fastce.lse_combine(parts)
    outs = [fastce.shard_cross_entropy_with_grad(x[:, a:b], t, st, class_start=a,
                                                 num_classes=C, return_z_loss=True,
                                                 return_lse=want_lse, **kw)
            for a, b in shard_bounds(widths)]
    for o in outs[1:]:
        for u, v in zip((o[0],) + o[2:], (outs[0][0],) + outs[0][2:]):
            assert np.array_equal(u, v, equal_nan=True)
    grad = np.concatenate([o[1] for o in outs], axis=1)
    return (outs[0][0], grad) + tuple(outs[0][2:])


def ulps(dtype, value):
    return 4 * np.spacing(np.abs(np.asarray(value, dtype=dtype))).astype(np.float64)


@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("shape", [(37, 300), (3, 2000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shards_match_torch_and_unsharded(isa, dtype, shape, split, opt):
    x, t, o = case(shape, dtype, opt, seed_of(shape, split, opt))
    widths = SPLITS[split](shape[1])
    got = sharded(x, t, widths, **o)
    truth = torch_lm_truth(x, t, o.get("z_loss", 0.0),
                           **{k: v for k, v in o.items() if k != "z_loss"})
    check_lm(got, truth, x, t, o, dtype)
    # the unsharded call: the same numbers to the merged state's double rounding (a few
    # u (L + sqrt(C)) per sample, the sums of exps and of the smoothing terms added in
    # another order) and the final rounding to the dtype (4 ulp)
    ref = fastce.cross_entropy_with_grad(x, t, return_z_loss=True, return_lse=True, **o)
    C = x.shape[1]
    L = logit_bound(transformed(x, o.get("logit_scale", 1.0), o.get("softcap")), C) + \
        (o.get("softcap") or 0.0)
    w = o.get("weight")
    terms = (x.shape[0] if o.get("reduction") == "sum" else 1) * \
        (1.0 if w is None else float(np.abs(w).max()))
    state_err = rtol_for(np.float64, C, L) / 4 * L * terms * (1 + o.get("z_loss", 0.0) * 2 * L)
    for g, r in zip((got[0], got[2], got[3]), (ref[0], ref[2], ref[3])):
        np.testing.assert_allclose(np.float64(g), np.float64(r), rtol=0, atol=ulps(dtype, r).max()
                                   + state_err + 4 * np.finfo(dtype).tiny)
    scale = grad_scale(x, t, o.get("weight"), o.get("reduction", "mean"), -100,
                       o.get("grad_output")) * (1 + 2 * o.get("z_loss", 0.0) *
                                               float(np.abs(ref[3]).max())) \
        * o.get("logit_scale", 1.0)
    assert np.abs(got[1].astype(np.float64) - ref[1]).max() <= 4 * np.finfo(dtype).eps * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_shards_segments_and_threads(isa, dtype):
    # shards longer than the kernel's segment (512 KiB) are split again inside; threads
    # give the same bits
    rng = np.random.default_rng(3)
    C = 300_000 if dtype == np.float32 else 150_000
    x, t = make_case(rng, (3, C), dtype, scale=5.0)
    widths = [C // 2 + 7, C - C // 2 - 7]
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    one = sharded(x, t, widths, **kw)
    truth = torch_lm_truth(x, t, 1e-4, label_smoothing=0.1)
    check_lm(one, truth, x, t, kw, dtype)
    two = sharded(x, t, widths, n_threads=2, **kw)
    for a, b in zip(one, two):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_weights_and_zero_weight_mean(isa, dtype):
    # class weights so small that the kernel rescales them by a power of two (a "mean"
    # whose factors would overflow): the states, made with the weights as given, are
    # rescaled alike; and a mean over weights summing to 0, as the unsharded call's
    rng = np.random.default_rng(21)
    x, t = make_case(rng, (4, 10), dtype)
    tiny = 1e-39 if dtype == np.float32 else 1e-310
    for w, kw in ((np.full(10, tiny, dtype), dict(label_smoothing=0.1)),
                  (np.array([1, -1, 2, 0, 1, 1, -2, 3, 1, 1], dtype), dict(label_smoothing=0.2)),
                  (np.array([1, -1, 2, 0, 1, 1, -2, 3, 1, 1], dtype), {})):
        tt = t if w[0] == tiny else np.array([0, 1, 0, 1])
        got = sharded(x, tt, [5, 5], weight=w, **kw)
        ref = fastce.cross_entropy_with_grad(x, tt, weight=w, return_z_loss=True,
                                             return_lse=True, **kw)
        for g, r in zip(got, ref):
            assert np.array_equal(np.isnan(g), np.isnan(r))
            fin = np.isfinite(r)
            assert np.array_equal(g[~fin & ~np.isnan(r)], r[~fin & ~np.isnan(r)])
            # the gradient's entries are accurate relative to its scale (entries that
            # cancel, to the scale's rtol, not their own)
            rt = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(g[fin], r[fin], rtol=rt,
                                       atol=rt * float(np.abs(r[fin]).max(initial=0.0)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_target_probability_near_one(isa, dtype):
    # p_y ~ 1 with the target alone in its shard: d loss / d x_y = -(the other classes'
    # mass), which only the masses give without cancellation (1 - p_y would round to 0)
    C, N = 64, 4
    x = np.zeros((N, C), dtype)
    t = np.array([5, 40, 0, 63])
    x[np.arange(N), t] = [30.0, 25.0, 40.0, 20.0]
    ref = fastce.cross_entropy_with_grad(x, t, reduction="sum")
    got = sharded(x, t, [6, 34, 24], reduction="sum")
    # analytic: the others' mass (C - 1) e^-d / (1 + (C - 1) e^-d), d the target's lead
    # (torch's float64 autograd forms 1 - p_y and loses it: 0 at d = 40)
    d = x[np.arange(N), t].astype(np.float64)
    ry = -(C - 1) * np.exp(-d) / (1 + (C - 1) * np.exp(-d))
    gy = got[1][np.arange(N), t]
    assert np.all(gy < 0)
    np.testing.assert_allclose(gy, ry, rtol=8 * np.finfo(dtype).eps)
    # two results within 8 eps of the truth: within 16 of each other
    np.testing.assert_allclose(gy, ref[1][np.arange(N), t], rtol=16 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_as_unsharded(isa, dtype):
    # +inf, -inf, NaN and rows of -inf in one shard or another: every output as the
    # unsharded call's (which tests/test_accuracy.py holds to torch's)
    inf, nan = np.inf, np.nan
    x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                  [1.0, inf, 3.0, 4.0, 5.0, 6.0],
                  [1.0, 2.0, 3.0, 4.0, inf, 6.0],
                  [1.0, 2.0, nan, 4.0, 5.0, 6.0],
                  [nan, inf, 3.0, 4.0, 5.0, 6.0],
                  [-inf, -inf, -inf, -inf, -inf, -inf],
                  [-inf, -inf, -inf, 4.0, 5.0, 6.0],
                  [1e30, -1e30, 3.0, 4.0, 5.0, -inf]], dtype)
    t = np.array([0, 1, 1, 4, 3, 2, 4, 0])
    for widths in ([3, 3], [1, 4, 1], [6]):
        for kw in (dict(reduction="none"), dict(reduction="none", label_smoothing=0.1),
                   dict(reduction="none", softcap=5.0)):
            got = sharded(x, t, widths, **kw)
            ref = fastce.cross_entropy_with_grad(x, t, return_z_loss=True, return_lse=True,
                                                 **kw)
            for g, r in zip(got, ref):
                fin = np.isfinite(r)
                assert np.array_equal(np.isnan(g), np.isnan(r)), (widths, kw)
                assert np.array_equal(g[~fin & ~np.isnan(r)], r[~fin & ~np.isnan(r)])
                np.testing.assert_allclose(g[fin], r[fin], rtol=1e-5 if dtype == np.float32
                                           else 1e-12, atol=1e-30)


def test_combine_and_state_fields(isa):
    rng = np.random.default_rng(5)
    x, t = make_case(rng, (6, 50), np.float64, ignore=0.3)
    parts = [fastce.lse_partial(x[:, a:b], t, class_start=a, num_classes=50)
             for a, b in shard_bounds([20, 30])]
    st = fastce.lse_combine(parts)
    assert st.shape == (6, 8) and st.dtype == np.float64
    assert fastce.STATE_FIELDS[0] == "max" and len(fastce.STATE_FIELDS) == 8
    # a list or one (P, N, 8) array; one shard's state is itself
    assert np.array_equal(fastce.lse_combine(np.stack(parts)), st)
    assert np.array_equal(fastce.lse_combine(parts[:1]), parts[0])
    np.testing.assert_allclose(st[:, 0] + np.log(st[:, 1]), fastce.logsumexp(x), rtol=1e-15)
    np.testing.assert_array_equal(st[:, 0], x.max(axis=1))
    kept = t != -100
    np.testing.assert_array_equal(st[kept, 6], 1.0)          # has_target, once
    np.testing.assert_array_equal(st[kept, 5], x[kept, t[kept]])  # target_logit
    # an ignored sample's state is still there (its lse, for return_lse)
    assert np.all(np.isfinite(st[~kept, 1]))
    # the all-reduce form: each state taken to the common max, then summed
    m = np.maximum(parts[0][:, 0], parts[1][:, 0])
    r = [p.copy() for p in parts]
    for p in r:
        fastce._core._rescale_states(p, m)
    summed = r[0] + r[1]
    summed[:, 0] = m
    np.testing.assert_allclose(summed, st, rtol=1e-14)
    # inputs untouched
    x0 = x.copy()
    fastce.shard_cross_entropy_with_grad(x[:, :20], t, st, num_classes=50)
    assert np.array_equal(x, x0)


def test_gradient_in_place_and_out(isa):
    rng = np.random.default_rng(8)
    x, t = make_case(rng, (20, 100), np.float32)
    parts = [fastce.lse_partial(x[:, a:b], t, class_start=a, num_classes=100)
             for a, b in shard_bounds([40, 60])]
    st = fastce.lse_combine(parts)
    _, g = fastce.shard_cross_entropy_with_grad(x[:, 40:], t, st, class_start=40,
                                                num_classes=100)
    local = np.ascontiguousarray(x[:, 40:])
    out = np.empty_like(local)
    assert fastce.shard_cross_entropy_with_grad(local, t, st, class_start=40, num_classes=100,
                                                out=out)[1] is out
    assert np.array_equal(out, g)
    fastce.shard_cross_entropy_with_grad(local, t, st, class_start=40, num_classes=100,
                                         out=local)
    assert np.array_equal(local, g)


def bad_calls():
    x, t = np.zeros((2, 3)), np.array([0, 4])
    st = fastce.lse_combine([fastce.lse_partial(x, t, num_classes=6),
                             fastce.lse_partial(x, t, class_start=3, num_classes=6)])
    half = fastce.lse_partial(x, t, num_classes=6)
    return x, t, st, half


@pytest.mark.parametrize("call, exc, message", [
    (lambda x, t, st, h: fastce.lse_partial(x, t, class_start=-1, num_classes=6), ValueError,
     "a shard of 3 classes starting at class_start=-1 does not fit in num_classes=6: expected "
     "0 <= class_start and class_start + 3 <= num_classes"),
    (lambda x, t, st, h: fastce.lse_partial(x, t, class_start=4, num_classes=6), ValueError,
     "a shard of 3 classes starting at class_start=4 does not fit in num_classes=6: expected "
     "0 <= class_start and class_start + 3 <= num_classes"),
    (lambda x, t, st, h: fastce.lse_partial(x, t, class_start=1.0, num_classes=6), TypeError,
     "class_start must be an int, got 1.0 of type float"),
    (lambda x, t, st, h: fastce.lse_partial(x, t), IndexError,
     "target 4 is out of bounds for 3 classes (at position (1,)); expected a class index in "
     "[0, 3) or ignore_index=-100"),
    (lambda x, t, st, h: fastce.lse_partial(x, np.array([0, 6]), num_classes=6), IndexError,
     "target 6 is out of bounds for 6 classes (at position (1,)); expected a class index in "
     "[0, 6) or ignore_index=-100"),
    (lambda x, t, st, h: fastce.lse_partial(x, t, num_classes=6, weight=np.ones(3)), ValueError,
     "weight must have shape (6,), one per class of the whole rows (num_classes), not of the "
     "shard; got shape (3,)"),
    (lambda x, t, st, h: fastce.lse_partial(x, np.full((2, 3), 1 / 3), num_classes=6), TypeError,
     "vocabulary-parallel cross-entropy takes class-index targets of shape (2,); probability "
     "targets are not supported"),
    (lambda x, t, st, h: fastce.lse_partial(np.zeros((2, 3, 2)), np.zeros((2, 2), int)),
     ValueError, "a shard's logits must be 2-D, (N, classes of the shard), got shape (2, 3, 2)"),
    (lambda x, t, st, h: fastce.shard_cross_entropy(x, t, h, num_classes=6), ValueError,
     "state is not the combination of every shard's state: sample 1's target class is held "
     "by 0 of the combined shards (expected exactly 1); merge the states of all shards, in "
     "class order, with lse_combine (or an all-reduce)"),
    (lambda x, t, st, h: fastce.shard_cross_entropy(x, t, fastce.lse_combine([h, h]),
                                                    num_classes=6), ValueError,
     "state is not the combination of every shard's state: sample 0's target class is held "
     "by 2 of the combined shards (expected exactly 1); merge the states of all shards, in "
     "class order, with lse_combine (or an all-reduce)"),
    (lambda x, t, st, h: fastce.shard_cross_entropy(x, t, st[:1], num_classes=6), ValueError,
     "state must have shape (2, 8) (one state per sample), got shape (1, 8)"),
    (lambda x, t, st, h: fastce.shard_cross_entropy(x, t, st.astype(np.float32),
                                                    num_classes=6), TypeError,
     "state must be a float64 array from lse_partial or lse_combine, got dtype float32"),
    (lambda x, t, st, h: fastce.shard_cross_entropy_with_grad(x, t, st, num_classes=6,
                                                              reduction="avg"), ValueError,
     "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    (lambda x, t, st, h: fastce.lse_combine([]), ValueError,
     "states is empty: lse_combine needs at least one shard's state"),
    (lambda x, t, st, h: fastce.lse_combine([st, st[:1]]), ValueError,
     "states[1] must have shape (2, 8) (one state per sample), got shape (1, 8)"),
    (lambda x, t, st, h: fastce.lse_combine([np.zeros(8)]), ValueError,
     "states[0] must have shape (N, 8) (one state per sample), got shape (8,)"),
    (lambda x, t, st, h: fastce.lse_combine(3), TypeError,
     "states must be a sequence of states from lse_partial, got int"),
])
def test_errors(isa, call, exc, message):
    with pytest.raises(exc) as info:
        call(*bad_calls())
    assert str(info.value) == message


# ---------------------------------------------------------------- torch.distributed

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, cases, tmp_path, timeout=60.0):
    """Run the worker on `world` ranks over gloo; returns their exit codes (after at
    most 3 timeout: a hang fails the test, it does not stall the suite)."""
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1", FASTCE_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_vocab_parallel_worker.py"),
                               str(r), str(world), str(port), str(path), str(tmp_path),
                               str(timeout)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    deadline = time.monotonic() + 3 * timeout
    codes, errs = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung past %.0f s" % (3 * timeout))
        codes.append(p.returncode)
        errs.append(err)
    return codes, errs


def result(tmp_path, i, rank):
    base = tmp_path / ("case%d_rank%d" % (i, rank))
    if os.path.exists(str(base) + ".json"):
        return json.loads((tmp_path / ("case%d_rank%d.json" % (i, rank))).read_text())
    with np.load(str(base) + ".npz") as f:
        return {k: f[k] for k in f.files}


def single_process(case):
    """The unsharded fastce.torch call on the full inputs (and the grad_output used)."""
    import fastce.torch as ft
    x, t, w = full_inputs(case)
    opts = dict(case.get("options", {}))
    opts.pop("num_classes", None)
    xt = torch.tensor(x)
    if case.get("half"):
        # the half logits, and their exact float32 values for the float64 truth
        xt = xt.to(getattr(torch, case["half"]))
        x = xt.float().numpy()
    xt.requires_grad_(True)
    out = ft.cross_entropy(xt, torch.tensor(t), weight=None if w is None else torch.tensor(w),
                           **opts)
    loss = out[0] if isinstance(out, tuple) else out
    go = None
    if opts.get("reduction") == "none":
        go = np.random.default_rng(case["seed"] + 1).standard_normal(len(t)).astype(x.dtype)
        loss.backward(torch.tensor(go))
    else:
        loss.backward()
    extras = [e.detach().numpy() for e in out[1:]] if isinstance(out, tuple) else []
    grad = (xt.grad.float() if case.get("half") else xt.grad).numpy()
    return x, t, w, go, loss.detach().numpy(), grad, extras


CASES = [
    dict(seed=1, N=40, dtype="float32", options=dict(label_smoothing=0.1, z_loss=1e-3,
                                                     return_z_loss=True, return_lse=True),
         weight=True, ignore=0.2),
    dict(seed=2, N=40, dtype="float64", options=dict(reduction="none", softcap=5.0)),
    dict(seed=3, N=40, dtype="float32", options=dict(reduction="sum", logit_scale=0.5),
         ignore=0.5),
    dict(seed=4, N=0, dtype="float32", options={}),
    dict(seed=12, N=40, dtype="float32", options=dict(reduction="none", label_smoothing=0.1),
         three_d=True),
    # half-precision shards: a float32 loss, each shard's gradient rounded once
    dict(seed=13, N=40, dtype="float32", half="bfloat16",
         options=dict(z_loss=1e-3, return_lse=True), ignore=0.2),
    dict(seed=14, N=40, dtype="float32", half="float16",
         options=dict(reduction="none", label_smoothing=0.1, softcap=10.0), weight=True),
]
# the unit roundoff of the half formats (one rounding of each gradient element), and
# half their smallest subnormal (the most one rounding moves a value in gradual underflow)
U_HALF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
TINY_HALF = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_over_gloo(isa, world, tmp_path):
    if isa != fastce.available_isas()[0]:
        pytest.skip("the ranks run the default variant; once is enough")
    widths = [700, 300, 500, 1][:world] if world == 4 else [600, 400]
    cases = [dict(c, widths=widths) for c in CASES]
    # errors every rank sees alike (the group stays usable after them)
    cases += [dict(seed=5, N=8, dtype="float32", widths=widths,
                   options=dict(num_classes=sum(widths) + 1)),
              dict(seed=6, N=8, dtype="float32", widths=widths, rows_off_by_one=True),
              dict(seed=7, N=8, dtype="float32", widths=widths, target_differs=True),
              dict(seed=11, N=8, dtype="float32", widths=widths, empty_shard=True),
              dict(seed=8, N=8, dtype="float32", widths=widths)]
    codes, errs = spawn(world, cases, tmp_path)
    assert codes == [0] * world, errs
    for i, c in enumerate(cases[:len(CASES)]):
        x, t, w, go, loss, grad, extras = single_process(c)
        o = {k: v for k, v in c["options"].items() if not k.startswith("return")}
        truth = torch_lm_truth(x, t, o.pop("z_loss", 0.0), weight=w, grad_output=go, **o)
        bounds = shard_bounds(widths)
        ranks = [result(tmp_path, i, r) for r in range(world)]
        g = np.concatenate([r["grad"] for r in ranks], axis=1)
        for r in ranks:
            assert np.array_equal(r["loss"], ranks[0]["loss"], equal_nan=True)
        if not c["N"]:
            assert np.isnan(loss) and np.isnan(ranks[0]["loss"]) and g.shape == (0, sum(widths))
            continue
        # as the single process's call, to a few ulp (merged in another order)
        np.testing.assert_allclose(np.float64(ranks[0]["loss"]), np.float64(loss), rtol=0,
                                   atol=ulps(x.dtype, loss).max() + 1e-30)
        for k, e in enumerate(extras):
            np.testing.assert_allclose(ranks[0]["extra%d" % k], e, rtol=8 * np.finfo(x.dtype).eps)
        scale = grad_scale(x, t, w, o.get("reduction", "mean"), -100, go) * \
            o.get("logit_scale", 1.0) * (1 + 2 * c["options"].get("z_loss", 0.0) * 30)
        L = logit_bound(transformed(x, o.get("logit_scale", 1.0), o.get("softcap")),
                        x.shape[1]) + (o.get("softcap") or 0.0)
        if c.get("half"):
            assert ranks[0]["loss"].dtype == np.float32  # not rounded to the shards' dtype
            # both float32 gradients rounded once: they may fall either side of a
            # rounding boundary, so up to one half ulp each (in gradual underflow,
            # TINY_HALF each) beyond float32's few ulps
            u = U_HALF[c["half"]]
            assert np.all(np.abs(g.astype(np.float64) - grad) <= 2 * u * np.abs(grad) +
                          2 * TINY_HALF[c["half"]] + 4 * np.finfo(np.float32).eps * scale)
            assert_grad_close(g, truth[3], rtol_for(x.dtype, x.shape[1], L) + u, scale)
            assert [r["grad"].shape[1] for r in ranks] == [b - a for a, b in shard_bounds(widths)]
            continue
        assert np.abs(g.astype(np.float64) - grad).max() <= 4 * np.finfo(x.dtype).eps * scale
        # and as torch in float64, to the tolerance of tests/test_transform.py
        assert_grad_close(g, truth[3], rtol_for(x.dtype, x.shape[1], L), scale)
        assert [r["grad"].shape[1] for r in ranks] == [b - a for a, b in bounds]
    msgs = {i: [result(tmp_path, i, r) for r in range(world)] for i in range(len(CASES), len(cases) - 1)}
    for i, want in zip(sorted(msgs), ["add up to %d classes, but num_classes=%d" % (sum(widths), sum(widths) + 1),
                                      "the ranks hold different numbers of rows",
                                      "the ranks were given different targets",
                                      "the arguments of rank(s) [1] failed their checks"]):
        for rank, r in enumerate(msgs[i]):
            if "checks" in want and rank == 1:  # its own error
                assert r["type"] == "ValueError" and "at least one class" in r["message"], r
                continue
            assert r["type"] == "ValueError" and want in r["message"], r
    # and a good call after them
    assert "loss" in result(tmp_path, len(cases) - 1, 0)


def test_vocab_parallel_rank_that_dies(isa, tmp_path):
    if isa != fastce.available_isas()[0]:
        pytest.skip("the ranks run the default variant; once is enough")
    cases = [dict(seed=9, N=8, dtype="float32", widths=[5, 5], die=[1])]
    t0 = time.monotonic()
    codes, errs = spawn(2, cases, tmp_path, timeout=20.0)
    assert codes[1] == 3 and codes[0] == 0, errs
    r = result(tmp_path, 0, 0)
    assert r["type"] == "RuntimeError" and "over the process group failed" in r["message"], r
    assert time.monotonic() - t0 < 60


def test_vocab_parallel_rank_that_never_calls(isa, tmp_path):
    if isa != fastce.available_isas()[0]:
        pytest.skip("the ranks run the default variant; once is enough")
    cases = [dict(seed=10, N=8, dtype="float32", widths=[5, 5], stall=[1])]
    t0 = time.monotonic()
    codes, errs = spawn(2, cases, tmp_path, timeout=5.0)
    assert codes == [0, 4], errs
    r = result(tmp_path, 0, 0)
    assert r["type"] == "RuntimeError" and "over the process group failed" in r["message"], r
    assert time.monotonic() - t0 < 40


def test_vocab_parallel_needs_a_group():
    import torch.distributed as dist

    import fastce.torch as ft
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        ft.vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
