"""`workbench bench --profile`: one decode step's kernels (on CPU: ops) by layer role, with time, bytes,
bandwidth and the gaps between them; on a tiny model, and on a hand-built GPU trace of the fused step."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from workbench.bench import step_bytes
from workbench.cli import main
from workbench.engine import Engine
from workbench.policy import Policy
from workbench.profiling import GROUPS, LINEAR_GROUPS, STEP, _launches, profile_step, read_bytes, role_ranges

SMALL = ["--model", "synthetic:tiny-llama", "--prompt-tokens", "8", "--new-tokens", "5", "--device", "cpu"]
LAYER_GROUPS = ("q|k|v", "o", "gate|up", "down", "head", "attention", "norms")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "bench", *SMALL, "--batch", "1",
                           "--policies", "dense,topk50", "--no-transformers", "--profile", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    return {r["policy"]: r["profile"] for r in result["rows"]}


def test_every_role_of_the_step_is_timed(bench):
    for policy, p in bench.items():
        assert "error" not in p and p["device"] == "cpu" and p["batch"] == 1
        assert list(p["groups"]) == list(GROUPS)
        for g in LAYER_GROUPS:
            assert p["groups"][g]["kernels"] > 0 and p["groups"][g]["us"] > 0, (policy, g)
        assert p["groups"]["q|k|v"]["bytes"] > 0 and p["groups"]["attention"]["bytes"] > 0
    assert bench["dense"]["groups"]["selection"]["kernels"] == 0  # no sparsity rule, nothing selects
    assert bench["topk50"]["groups"]["selection"]["kernels"] > 0 and bench["topk50"]["groups"]["selection"]["us"] > 0


def test_groups_sum_to_the_kernels_and_leave_gaps(bench):
    for p in bench.values():
        total = sum(v["us"] for v in p["groups"].values())
        assert total == pytest.approx(p["kernel_us"], abs=0.05)
        assert 0 < p["kernel_us"] <= p["step_us"] and p["gaps_us"] >= 0
        assert p["gaps_us"] == pytest.approx(p["step_us"] - p["kernel_us"], abs=0.05)
        assert sum(v["share"] for v in p["groups"].values()) <= 1.0 + 1e-3
        assert p["kernels_per_step"] == sum(v["kernels"] for v in p["groups"].values())
        for v in p["groups"].values():  # bandwidth is bytes over time
            if v["gb_s"] is not None:
                assert v["gb_s"] == pytest.approx(v["bytes"] / v["us"] / 1e3, rel=0.01)
        top = p["top_kernels"]
        assert top and [k["us"] for k in top] == sorted((k["us"] for k in top), reverse=True)
        assert all(set(k["groups"]) <= set(GROUPS) and k["calls"] > 0 for k in top)


def test_sparse_bytes_skip_columns_at_batch_one(bench):
    dense, sparse = bench["dense"]["groups"], bench["topk50"]["groups"]
    for g in ("q|k|v", "o", "gate|up", "down"):
        assert sparse[g]["bytes"] == pytest.approx(dense[g]["bytes"] / 2, rel=0.05), g
    assert sparse["head"]["bytes"] == dense["head"]["bytes"]  # the head keeps its dense input


def test_table_is_printed_after_the_main_table(capsys):
    assert main(["bench", *SMALL, "--batch", "1", "--policies", "dense", "--no-transformers", "--profile"]) == 0
    out = capsys.readouterr().out
    assert out.index("ms/step") < out.index("dense, batch 1: step")
    for word in ("q|k|v", "gate|up", "attention", "norms", "head", "gaps", "GB/s"):
        assert word in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_reads_one_byte_per_weight(dtype):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", dtype=dtype)
    dense = read_bytes(engine.model, 1, 16)
    engine.reconfigure(Policy.parse("int8"))
    int8 = read_bytes(engine.model, 1, 16)
    size = torch.empty((), dtype=dtype).element_size()
    for g in LINEAR_GROUPS:  # the stored bytes: one byte a weight, plus per-row scales
        assert int8[g] / dense[g] == pytest.approx(1 / size, rel=0.15), g
    assert int8["attention"] == dense["attention"]  # the KV cache stays in the model's dtype


def test_profile_step_keeps_the_runner_and_model_as_they_were():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", policy=Policy.parse("topk50"))
    runner = engine.runner(2, 64)
    sparsifiers = {fqn: m.sparsifier for fqn, m in engine.model.named_modules() if hasattr(m, "sparsifier")}
    p = profile_step(engine, runner, 2, context=20, steps=2)
    assert p["context"] == 20 and p["steps_profiled"] == 2 and p["step_source"] == "profiled eager step"
    assert runner.cache.host_lengths == [0, 0] and runner.cache.lengths.tolist() == [0, 0]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in engine.model.modules())
    assert all(m.sparsifier is sparsifiers[fqn] for fqn, m in engine.model.named_modules() if hasattr(m, "sparsifier"))
    nbytes = sum(v["bytes"] for g, v in p["groups"].items() if g != "norms")
    assert nbytes == step_bytes(engine, 2, 20)  # the groups split bench's roofline bytes, no more, no less


def test_hooks_are_removed_when_the_step_raises():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    with pytest.raises(RuntimeError), role_ranges(engine.model):
        engine.model.model.layers[0].self_attn.q_proj(torch.zeros(1, 3))  # wrong width
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in engine.model.modules())


# ---- the GPU rules, on a hand-built trace of one fused step -----------------------------------------------------
class _Event(SimpleNamespace):
    def __init__(self, name, start, end, device=DeviceType.CPU, parent=None, kernels=(), annotation=False):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        super().__init__(name=name, time_range=span, device_type=device, cpu_parent=parent, is_async=False,
                         kernels=[SimpleNamespace(name=n, duration=d) for n, d in kernels],
                         is_user_annotation=annotation, id=id(self))


def _fused_step_trace(linked: bool):
    """The fused step with int8 down: cuBLAS launches through aten ops inside the o, down and head
    ranges (o and down each end with a split-K reduce of one name and duration: which op launched which
    decides the layer order after them); Triton kernels from Python (no op), the down projection's
    inside its range; q|k|v and gate|up as unranged concatenated GEMMs. `linked`: device events name
    their launching op (newer torch), else only each op's kernel list says what it launched."""
    cuda = DeviceType.CUDA
    step = _Event(STEP, 0, 100)
    o, down, head = (_Event(f"workbench::{g}", a, b, parent=step) for g, a, b in (("o", 40, 50), ("down", 70, 80),
                                                                                   ("head", 90, 95)))
    ops = {"o": _Event("aten::mm", 41, 49, parent=o), "down": _Event("aten::add_", 78, 79, parent=down),
           "head": _Event("aten::mm", 91, 94, parent=head)}
    trace = [("indexSelectLargeIndex", "other", None), ("_add_rmsnorm_kernel", "norms", None),
             ("nvjet_tst_qkv", "q|k|v", None), ("_rope_cache_kernel", "attention", None),
             ("_sparse_decode_kernel", "attention", None), ("_merge_splits_kernel", "attention", None),
             ("nvjet_splitK_o", "o", "o"), ("splitKreduce_kernel", "o", "o"), ("_add_rmsnorm_kernel", "norms", None),
             ("nvjet_tst_gateup", "gate|up", None), ("_silu_mul_kernel", "gate|up", None),
             ("_topk_threshold_kernel", "selection", None), ("Memset (Device)", "down", None),
             ("_w8_kernel", "down", None), ("splitKreduce_kernel", "down", "down"),
             ("_add_rmsnorm_kernel", "norms", None), ("nvjet_head", "head", "head"), ("elementwise_kernel", "other", None)]
    times = {"nvjet_splitK_o": 3.0, "nvjet_head": 10.0}
    gpu, t = [], 100.0
    for name, _, op in trace:
        d = times.get(name, 1.5)
        gpu.append(_Event(name, t, t + d, device=cuda))
        if op is not None:
            ops[op].kernels.append(SimpleNamespace(name=name, duration=d))
        if linked:
            gpu[-1].linked_correlation_id = ops[op].id if op is not None else 0
        t += d + 0.5
    in_down = [e for e in gpu if e.name in ("Memset (Device)", "_w8_kernel")]
    spans = [_Event("workbench::down", in_down[0].time_range.start, in_down[-1].time_range.end, device=cuda,
                    annotation=True), _Event(STEP, 100.0, t, device=cuda, annotation=True)]
    events = [step, o, down, head, *ops.values(), *gpu[::-1], *spans]  # kernels in any order: sorted by start
    return events, [(name, group) for name, group, _ in trace]


@pytest.mark.parametrize("linked", [True, False])
def test_gpu_kernels_follow_ranges_names_and_the_layer_order(linked):
    events, expected = _fused_step_trace(linked)
    launches, step_us = _launches(events, cuda=True)
    assert [(name, group) for name, group, *_ in launches] == expected
    assert step_us == 100
    assert sum(us for _, _, us, _ in launches) == pytest.approx(3.0 + 10.0 + 1.5 * (len(expected) - 2))
    rules = {name: rule for name, _, _, rule in launches}
    assert rules["nvjet_splitK_o"] == "op range" and rules["_w8_kernel"] == "GPU span"
    assert rules["nvjet_tst_qkv"] == "layer order" and rules["_rope_cache_kernel"] == "name"


def test_the_bytes_a_step_must_read_follow_the_architecture():
    """The roofline's cache bytes: keys and values per head (a sliding layer only its window), or a
    latent and a rope key per position for latent attention (plus V3.2's index key); routed experts:
    the share a batch's tokens reach under even routing, top-k of E at batch 1, nearly all at 64."""
    from workbench.profiling import expert_read_bytes, kv_read_bytes
    llama = Engine.from_pretrained("synthetic:tiny-llama", device="cpu").model
    assert kv_read_bytes(llama, 2, 100) == 2 * 2 * 2 * 16 * 100 * 2 * 4  # K+V, layers, kv heads, dim, ctx, batch
    gemma = Engine.from_pretrained("synthetic:gemma3-tiny-window", device="cpu").model
    assert kv_read_bytes(gemma, 1, 100) == 2 * 2 * 16 * (8 + 100) * 4  # the sliding layer reads its 8 keys
    for name, index in (("synthetic:tiny-deepseek_v3", 0), ("synthetic:tiny-deepseek_v32", 16)):
        mla = Engine.from_pretrained(name, device="cpu").model
        cfg = mla.config
        assert kv_read_bytes(mla, 1, 10) == cfg.num_hidden_layers * (16 + 8 + index) * 10 * 4
    moe = Engine.from_pretrained("synthetic:deepseek-v3-tiny", device="cpu").model
    cfg = moe.config
    every = sum(p.numel() * 4 for layer in moe.model.layers if hasattr(layer.mlp, "experts")
                for p in layer.mlp.experts.parameters())
    assert expert_read_bytes(moe, 1) == pytest.approx(every * cfg.num_experts_per_tok / cfg.n_routed_experts, rel=1e-6)
    assert every * 0.99 < expert_read_bytes(moe, 64) <= every and expert_read_bytes(llama, 1) == 0
