"""Switching back to a policy the engine ran reuses its modules (kernels, layouts) and its version, so a
batch runner replays the decoder and graphs it built then (`workbench.policy_builds`); anything that changes
modules behind the policy (a LoRA attach, `invalidate`) forgets them all; the number kept is bounded."""
import torch

from workbench import Engine, Policy
from workbench.policy_builds import KEEP_POLICIES
from workbench.runtime.sampling import SamplingParams, Sequence
from workbench.transforms import wrappers


def _modules(engine):
    return {fqn: id(w) for fqn, w in wrappers(engine.model)}


def test_switching_back_reuses_the_modules_and_the_version(sample_ids):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    a, b = Policy.uniform(0.5, "topk", "int8"), Policy.uniform(precision="int4-g32")
    engine.reconfigure(a)
    version_a, modules_a, logits_a = engine.version, _modules(engine), engine.forward(sample_ids)
    engine.reconfigure(b)
    version_b, logits_b = engine.version, engine.forward(sample_ids)
    assert version_b != version_a and _modules(engine).keys() == modules_a.keys() != set()
    assert all(i not in modules_a.values() for i in _modules(engine).values())  # b's own wrappers
    engine.reconfigure(a)
    assert engine.version == version_a and _modules(engine) == modules_a  # the very same modules again
    assert torch.equal(engine.forward(sample_ids), logits_a)
    engine.reconfigure(b)
    assert engine.version == version_b and torch.equal(engine.forward(sample_ids), logits_b)
    engine.reconfigure(Policy.identity())
    assert not list(wrappers(engine.model)) and torch.equal(engine.forward(sample_ids),
                                                            engine.reference_logits(sample_ids))


def test_a_runner_keeps_its_decoder_per_version():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    runner = engine.runner(2, 64, cached=False)
    seq = lambda: Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=3))  # noqa: E731

    def decode():
        runner.admit([seq()])
        while runner.running:
            runner.step()
            runner.retire()
        return runner.decoder
    a, b = Policy.uniform(0.5, "topk"), Policy.uniform(precision="int8")
    engine.reconfigure(a)
    decoder_a = decode()
    engine.reconfigure(b)
    assert decode() is not decoder_a
    engine.reconfigure(a)
    assert decode() is decoder_a  # built once for a's modules, reused
    engine.invalidate()  # modules changed behind the policy: nothing built before is trusted
    engine.reconfigure(a)
    assert decode() is not decoder_a


def test_lora_and_invalidate_forget_every_kept_policy():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    a, b = Policy.uniform(precision="int8"), Policy.uniform(precision="int4-g32")
    engine.reconfigure(a)
    modules_a = _modules(engine)
    engine.reconfigure(b)
    engine.invalidate()
    version = engine.version
    engine.reconfigure(a)
    assert engine.version > version and set(_modules(engine).values()).isdisjoint(modules_a.values())


def test_only_the_last_few_policies_stay_built_and_a_lean_engine_keeps_none():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    policies = [Policy.uniform(precision=p) for p in ("int8", "int4-g32", "int4-g64", "int3-g32", "int2-g32", "fp8")]
    assert len(policies) > KEEP_POLICIES
    engine.reconfigure(policies[0])
    first = engine.version, _modules(engine)
    for p in policies[1:]:
        engine.reconfigure(p)
    assert len(engine.builds.versions) == KEEP_POLICIES
    engine.reconfigure(policies[0])  # evicted: built again, under a new version
    assert engine.version != first[0] and set(_modules(engine).values()).isdisjoint(first[1].values())
    engine.reconfigure(policies[-1])  # still kept
    assert engine.model.workbench_built_new == 0
    lean = Engine.from_pretrained("synthetic:tiny-llama", device="cpu", keep_reference=False)
    lean.reconfigure(policies[0])
    v = lean.version
    lean.reconfigure(policies[1])
    lean.reconfigure(policies[0])
    assert lean.version not in (v,) and lean.builds.wrappers is None


def test_the_scheduler_warms_every_rung_in_its_own_runner():
    from workbench.scheduler import Scheduler
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    scheduler = Scheduler(engine, max_num_seqs=2, max_model_len=64)
    try:
        rungs = [Policy.parse("topk30"), Policy.parse("topk50")]
        scheduler.set_policy(rungs[0])
        scheduler.warm_up(16, policies=rungs)
        assert engine.policy.name == "topk30"
        built = set(scheduler.runner.built_versions)
        assert len(built) == 2 and engine.version in built  # both rungs' decoders, the current one in use
        answer = scheduler.generate([5, 6, 7], SamplingParams(max_new_tokens=4), timeout=60)
        scheduler.set_policy(rungs[1])
        assert engine.version in built and scheduler.generate([5, 6, 7], SamplingParams(max_new_tokens=4),
                                                              timeout=60)["text"] is not None
        assert answer["text"] is not None
    finally:
        scheduler.close()


def test_a_wrapper_built_in_inference_mode_counts_outside_it(sample_ids):
    """The scheduler's loop reconfigures under inference mode; the wrapper it builds is reused later by
    callers outside it, whose in-place counter updates must not fail on inference tensors."""
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    sparse = Policy.uniform(0.5, "topk")
    with torch.inference_mode():
        engine.reconfigure(sparse)
    engine.reconfigure(Policy.identity())
    engine.reconfigure(sparse)  # the same wrappers, outside inference mode now
    assert engine.model.workbench_built_new == 0
    with torch.no_grad():
        engine.forward(sample_ids)
    assert engine.stats()["achieved_sparsity"]["overall"] > 0.4


def test_stats_report_the_kv_cache_generate_holds():
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu")
    assert engine.stats()["kv_cache"] is None
    engine.generate(["a prompt"], max_new_tokens=4, chat=False)
    cfg = engine.model.config
    kv = engine.stats()["kv_cache"]
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert kv["bytes"] == kv["slots"] * kv["capacity"] * per_token > 0
