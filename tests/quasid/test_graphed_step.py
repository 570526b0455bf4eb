"""The CUDA-graph training step (`fit.GraphedStep`, `train.cuda_graph`): its static-buffer step
trains exactly as `train_step` (on the CPU without capture; on CUDA with capture when there is
a GPU), and the settings it cannot run with are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quasid.core.schedule import lr_factor
from quasid.tokenizer.batches import BatchSampler
from quasid.tokenizer.config import TrainConfig, tokenizer_config
from quasid.tokenizer.fit import GraphedStep, all_codes, build_optimizer, tensor_lr, train_step
from quasid.tokenizer.pairs import PairIndex
from quasid.tokenizer.tokenizer import make_tokenizer
from tests.quasid.sid_testing import one_thread  # noqa: F401 (autouse fixture)

TINY = dict(hidden=[64, 32], latent=16, levels=3, codebook_size=16, tower_dim=16,
            kmeans_iters=5, train=dict(batch_size=128, lr=3e-3))
CUDA = torch.cuda.is_available()


def _world(device: str = "cpu", n: int = 300, dim: int = 12) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(0)
    content = torch.tensor(rng.normal(size=(n, dim)), dtype=torch.float32, device=device)
    return content, rng.integers(0, n, size=(3 * n, 2))


def _trainer(name: str, content: torch.Tensor, pairs: np.ndarray, capturable: bool = False,
             total_steps: int = 100):
    """(model, sampler, params, optimizer, scheduler) as `fit_model` builds them, on the
    dense pair path (the one `GraphedStep` runs) whatever the device."""
    device = content.device
    tok = make_tokenizer(name, TINY)
    model = tok._build(content.shape[1]).to(device)
    model.sparse_pairs = False
    model.set_standardization(content)
    cfg = tok.config
    g = torch.Generator().manual_seed(0)
    sampler = BatchSampler(model.standardize(content), content,
                           PairIndex(pairs, content.shape[0], device), cfg.train.batch_size, g,
                           need_positive=cfg.needs_pairs,
                           near_duplicate=cfg.tau_dup if cfg.hamr else None)
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encoder(sampler.x).float(), g, cfg.kmeans_iters)
    sampler.set_codes(all_codes(model, content))
    params, opt, sched = build_optimizer(model, cfg.train, total_steps, device,
                                         capturable=capturable)
    model.train()
    sampler.new_epoch()
    return model, sampler, params, opt, sched


def _run(trainer, step_fn, steps: int, amp: bool = False, loss_fn=None
         ) -> list[dict[str, torch.Tensor]]:
    """`steps` steps through `step_fn` (of `loss_fn`, default the model's losses): a
    `GraphedStep` gets the sampler's draws, `train_step` its batches; each step's terms,
    cloned (graph outputs are reused)."""
    model, sampler, params, opt, sched = trainer
    loss_fn = loss_fn or model.losses
    out = []
    for k in range(steps):
        step = k % sampler.steps_per_epoch
        item = sampler.draw(step) if isinstance(step_fn, GraphedStep) else sampler.batch(step)
        terms = step_fn(loss_fn, item, k / 50, params, opt, sched, 1.0, amp)
        out.append({key: v.detach().clone() for key, v in terms.items()})
    return out


@pytest.mark.parametrize("name", ["rqvae", "quasid", "adasid"])
def test_the_static_buffer_step_matches_train_step_bitwise(name):
    content, pairs = _world()
    eager, static = _trainer(name, content, pairs), _trainer(name, content, pairs)
    step = GraphedStep(static[1].assemble, capture=False)
    a = _run(eager, train_step, 6)
    b = _run(static, step, 6)
    for ta, tb in zip(a, b):  # every step's terms, not only the end state
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    for (ka, va), vb in zip(eager[0].state_dict().items(), static[0].state_dict().values()):
        assert torch.equal(va, vb), ka
    for pa, pb in zip(eager[2], static[2]):
        sa, sb = eager[3].state[pa], static[3].state[pb]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert eager[4].get_last_lr() == static[4].get_last_lr()
    assert step.calls == 6 and step.graph is None


def test_the_static_draw_is_reused_and_the_assembled_batch_is_the_samplers():
    content, pairs = _world()
    model, sampler, params, opt, sched = _trainer("quasid", content, pairs)
    step = GraphedStep(sampler.assemble, capture=False)
    step(model.losses, sampler.draw(0), 0.0, params, opt, sched, 1.0, False)
    buffer = step.drawn.data_ptr()
    state = sampler.generator.get_state()
    drawn = sampler.draw(1)
    sampler.generator.set_state(state)
    batch = sampler.batch(1)  # the same draws as a batch, P as pair lists (the CPU's way)
    step(model.losses, drawn, 0.1, params, opt, sched, 1.0, False)
    assert step.drawn.data_ptr() == buffer and torch.equal(step.drawn, drawn)
    assert drawn.shape == (5 * sampler.anchors,)  # B rows, then A positive flags
    for name in ("rows", "x", "unit", "anchor", "target", "pair_weight"):
        assert torch.equal(getattr(step.batch, name), getattr(batch, name)), name
    # the assembled B x B mask holds the batch's positive pairs in both orders, and no more
    pos = batch.positive_pairs
    assert pos.shape[0] > 0 and step.batch.positive[pos[:, 0], pos[:, 1]].all()
    assert torch.equal(step.batch.positive, batch.positive_mask())
    assert float(step.progress) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"draw changed from \(160,\) torch.int64 to \(156,\)"):
        step(model.losses, sampler.draw(2)[:-4], 0.2, params, opt, sched, 1.0, False)
    with pytest.raises(ValueError, match=r"to \(160,\) torch.float32"):
        step(model.losses, sampler.draw(2).float(), 0.2, params, opt, sched, 1.0, False)


def test_what_cannot_be_graphed_is_refused():
    content, pairs = _world()
    model, sampler, params, opt, sched = _trainer("quasid", content, pairs)
    with pytest.raises(ValueError, match="capture needs CUDA parameters"):
        GraphedStep(sampler.assemble)(model.losses, sampler.draw(0), 0.0, params, opt, sched,
                                      1.0, False)
    model.sparse_pairs = None  # the CPU default: sparse pair lists
    with pytest.raises(ValueError, match="dense pair path"):
        GraphedStep(sampler.assemble, capture=False)(model.losses, sampler.draw(0), 0.0,
                                                     params, opt, sched, 1.0, False)
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(sampler.assemble, warmup=0)
    with pytest.raises(ValueError, match="capturable=True needs CUDA"):
        build_optimizer(model, TrainConfig(), 10, torch.device("cpu"), capturable=True)


def test_cuda_graph_and_compile_combine():
    train = tokenizer_config("quasid", {"train": {"cuda_graph": True, "compile": True}}).train
    assert train.cuda_graph and train.compile


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_the_scheduler_reaches_the_tensor_lr_the_graph_reads():
    # replays read the lr through one tensor: after each schedule step (filled in place by
    # torch's scheduler, or re-pinned should it assign) that tensor holds the scheduled value
    content, pairs = _world()
    model, _, _, opt, sched = _trainer("rqvae", content, pairs, total_steps=40)
    lr = tensor_lr(opt)[0]
    assert tensor_lr(opt)[0] is lr  # kept when it is one already
    step = GraphedStep(None, capture=False)
    step._lrs = [lr]
    for k in range(1, 6):
        sched.step()
        step._repin_lr(opt)
        assert opt.param_groups[0]["lr"] is lr
        assert float(lr) == pytest.approx(3e-3 * lr_factor(k, 40, 2, 0.05), rel=1e-6)
        assert float(sched.get_last_lr()[0]) == pytest.approx(float(lr), rel=1e-6)
    opt.param_groups[0]["lr"] = 1e-4  # a scheduler that assigns instead of filling
    step._repin_lr(opt)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-4)


def test_cuda_graph_is_ignored_on_the_cpu():
    content, pairs = _world(n=200)
    cfg = TINY | {"train": TINY["train"] | {"epochs": 1}}
    plain = make_tokenizer("rqvae+hamr", cfg)
    plain.fit(content.numpy(), pairs)
    graphed = make_tokenizer("rqvae+hamr", cfg | {"train": cfg["train"] | {"cuda_graph": True}})
    history = graphed.fit(content.numpy(), pairs)
    assert isinstance(history["epochs"][0]["lr"], float)
    for va, vb in zip(plain.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(va, vb)


# Measured on an H200 (2026-12-01): in fp32 the graphed steps equal the eager ones bitwise
# (adasid, quasid: every term of 10 steps and the state after them); under bf16 autocast
# quasid's are bitwise too, while adasid's drift from the second step on (1.6e-3, then
# code flips) although two eager runs agree bitwise. The one difference of the two paths
# under autocast is the graph's cache_enabled=False (capture requires it: a weight cast once
# and shared in the eager step is cast per use); that this is the cause was not isolated.
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, amp, compiled", [
    ("rqvae", False, False), ("quasid", False, False), ("adasid", False, False),
    ("uniform", False, False), ("rqvae", True, False), ("quasid", True, False),
    ("uniform", True, False), ("rqvae", False, True), ("quasid", False, True)])
def test_cuda_graph_replays_match_eager_steps(name, amp, compiled):
    """Graphed steps against eager ones; `compiled`: both run `torch.compile`'d losses (the
    graph then holds the compiled kernels)."""
    content, pairs = _world("cuda", n=600, dim=16)
    eager = _trainer(name, content, pairs, capturable=True)
    graphed = _trainer(name, content, pairs, capturable=True)
    step = GraphedStep(graphed[1].assemble, warmup=3)
    if compiled:
        torch._dynamo.reset()  # each test compiles its own models: no cache limit reached
    def losses(trainer):  # None: the model's own losses
        return torch.compile(trainer[0].losses) if compiled else None

    a = _run(eager, train_step, 10, amp=amp, loss_fn=losses(eager))
    b = _run(graphed, step, 10, amp=amp, loss_fn=losses(graphed))
    assert step.graph is not None and step.calls == 10  # 3 warm-up, capture + replay, 6 replays
    # the replays trained on their own batches: the terms change from step to step
    assert not torch.equal(b[-1]["rec"], b[-2]["rec"])
    # the same kernels on the same inputs: equal up to a library's choice of another algorithm
    # on the capture stream (the message says how far apart)
    for k, (ta, tb) in enumerate(zip(a, b)):
        assert ta.keys() == tb.keys()
        for key in ta:
            diff = (ta[key].float() - tb[key].float()).abs().max().item()
            assert torch.allclose(ta[key].float(), tb[key].float(), rtol=1e-3, atol=1e-5), \
                (k, key, diff)
    for (ka, va), vb in zip(eager[0].state_dict().items(), graphed[0].state_dict().values()):
        diff = (va.float() - vb.float()).abs().max().item()
        assert torch.allclose(va.float(), vb.float(), rtol=1e-3, atol=1e-5), (ka, diff)
    # the schedule reached the replays: both optimizers' lr tensors hold the same value
    assert float(graphed[3].param_groups[0]["lr"]) == float(eager[3].param_groups[0]["lr"])


# Measured on an H200 (2026-12-01, this test's world): under bf16 autocast compiled quasid
# losses train differently from eager ones (epoch totals 52.27, 10.49, 4.51 against 67.08,
# 11.83, 4.33; fp32 43.94, 7.38, 3.87 either way): inductor keeps fp32 inside its fused
# kernels where eager rounds to bf16. The graph adds no difference of its own (compiled +
# graphed steps equal compiled ones to ~1e-7 in fp32, and depart from eager ones as the
# compiled ones do under bf16), so a graphed fit is compared with an ungraphed fit of the
# same `compile` setting.
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_a_cuda_graph_fit_matches_the_eager_fit(compiled):
    content, pairs = _world("cpu", n=600, dim=16)
    cfg = TINY | {"train": TINY["train"] | {"epochs": 3, "compile": compiled}}
    torch._dynamo.reset()
    eager = make_tokenizer("quasid", cfg)
    h_eager = eager.fit(content.numpy(), pairs, device="cuda")
    torch._dynamo.reset()
    graphed = make_tokenizer("quasid", cfg | {"train": cfg["train"] | {"cuda_graph": True}})
    h_graph = graphed.fit(content.numpy(), pairs, device="cuda")
    # the eager fit's AdamW takes a float lr, the graphed one a float32 tensor: not bitwise,
    # so a loose bound (a graph replaying stale inputs misses it by far; the step test above
    # checks that the replays follow the schedule)
    assert len(h_graph["epochs"]) == 3
    for ra, rb in zip(h_eager["epochs"], h_graph["epochs"]):
        assert rb["total"] == pytest.approx(ra["total"], rel=2e-2)
        assert rb["rec"] == pytest.approx(ra["rec"], rel=2e-2)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-6)
    codes_a, codes_b = eager.encode(content.numpy()), graphed.encode(content.numpy())
    assert (codes_a == codes_b).all(axis=1).mean() > 0.8
