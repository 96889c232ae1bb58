"""GGUF export (`workbench.export.gguf`): the file transformers' GGUF loader reads back computes exactly the
policy model's logits where a GGML type holds the format, re-quantizes only when asked, and bad input is
one line with nothing written."""
import json
import os

import pytest
import torch

from workbench import Engine, Policy
from workbench.cli import main
from workbench.errors import InputError
from workbench.export import gguf as gguf_export

pytest.importorskip("gguf")


def _engine(precision="int4-g32", model="synthetic:tiny-llama", **kw):
    return Engine.from_pretrained(model, device="cpu", policy=Policy.uniform(precision=precision, **kw))


def _read_back(engine, path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([engine.tokenizer("def export(model): return model.to('gguf')  # exact?")["input_ids"]])
    with torch.inference_mode():
        return model(ids).logits[0], engine.forward(ids)[0].float()


@pytest.mark.parametrize("precision, head, types", [
    ("int4-g32", None, {"Q4_0", "F32"}),
    ("int4-g32-asym", "int4-g32", {"Q4_1", "Q4_0", "F32"}),
    ("int8-g32", None, {"Q8_0", "F32"}),
    ("bf16", None, {"BF16", "F32"}),
])
def test_exact_formats_read_back_bit_for_bit(tmp_path, precision, head, types):
    engine = Engine.from_pretrained("synthetic:tiny-llama", device="cpu",
                                    policy=Policy.uniform(precision=precision, head=head))
    report = gguf_export.export_gguf(engine, tmp_path / "m.gguf", progress=False)
    assert set(report["by_type"]) == types and not report["requantized"]
    exported, policy = _read_back(engine, tmp_path / "m.gguf")
    if precision == "bf16":  # the same weights, but the workbench multiplies a bf16 cast in bf16 and the
        # reader in float32: the logits differ by activation rounding only
        assert torch.nn.functional.cosine_similarity(exported, policy, dim=-1).min() > 0.9999
    else:
        assert torch.equal(exported, policy)


def test_the_default_model_exports_exactly_with_its_tokenizer(tmp_path):
    """Tied embeddings, grouped-query attention, its RoPE base and its BPE tokenizer and chat template."""
    from transformers import AutoTokenizer
    engine = _engine(model="default")
    path = tmp_path / "default.gguf"
    report = gguf_export.export_gguf(engine, path, progress=False)
    assert report["by_type"]["Q4_0"]["tensors"] == 210 and "output.weight" not in {r["name"] for r in report["tensors"]}
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "def f(x):\n    return x ** 2  # squared"
    assert tok(text)["input_ids"] == engine.tokenizer(text)["input_ids"]
    assert tok.chat_template == engine.tokenizer.chat_template
    check = gguf_export.check_gguf(engine, path, max_tokens=128)  # one read-back: transformers' GGUF dequant is slow
    assert check["vs_policy"]["max_abs_logit_diff"] == 0 and check["vs_policy"]["top1"] == 1.0  # equal logits
    assert check["vs_reference"]["kld_mean"] > 1e-3  # int4 is not the unmodified model: the check can tell


def test_a_format_without_an_exact_type_is_refused_or_requantized_on_request(tmp_path):
    engine = _engine("int8")
    path = tmp_path / "m.gguf"
    with pytest.raises(InputError, match="no exact GGML type"):
        gguf_export.export_gguf(engine, path, progress=False)
    assert not os.listdir(tmp_path)
    report = gguf_export.export_gguf(engine, path, allow_requantize=True, progress=False)
    assert report["by_type"]["Q8_0"]["tensors"] == 14 and len(report["requantized"]) == 14
    check = gguf_export.check_gguf(engine, path, max_tokens=128)
    assert 0 < check["vs_policy"]["kld_mean"] < 1e-3  # Q8_0's blocks of 32 are not per-row int8, but close


def test_runtime_only_settings_need_weights_only_and_go_to_a_sidecar(tmp_path):
    engine = _engine("int4-g32", sparsity=0.5)
    path = tmp_path / "m.gguf"
    with pytest.raises(InputError, match="weights-only"):
        gguf_export.export_gguf(engine, path, progress=False)
    report = gguf_export.export_gguf(engine, path, weights_only=True, progress=False)
    sidecar = json.loads(open(report["sidecar"]).read())
    assert "activation sparsity (topk, 0.5 of the inputs)" in sidecar["runtime_only"]


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    engine = _engine()
    calls = []

    def broken(e, *args):
        calls.append(e["name"])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(e, *args)
    real = gguf_export._tensor_bytes
    monkeypatch.setattr(gguf_export, "_tensor_bytes", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_export.export_gguf(engine, tmp_path / "m.gguf", progress=False)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("model", ["synthetic:tiny-qwen2", "synthetic:tiny-mistral", "synthetic:tiny-gemma3"])
def test_other_architectures_export_exactly(tmp_path, model):
    """Qwen2 (biases on q / k / v, kept as loaded; no rotary row order), Mistral (written as llama) and
    Gemma 3 (norms stored as 1 + w, its own head size, sliding-window metadata, q / k norms, the scaled
    and tied embedding)."""
    engine = _engine(model=model)
    gguf_export.export_gguf(engine, tmp_path / "m.gguf", progress=False)
    exported, policy = _read_back(engine, tmp_path / "m.gguf")
    assert torch.equal(exported, policy)


def test_an_architecture_the_writer_does_not_know_is_one_line(tmp_path):
    with pytest.raises(InputError, match="not 'deepseek_v3'"):
        gguf_export.export_gguf(_engine(model="synthetic:tiny-deepseek_v3"), tmp_path / "m.gguf", progress=False)
    assert not os.listdir(tmp_path)


def test_cli_export_and_its_bad_inputs(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", "synthetic:tiny-llama", "--precision", "int4-g32", "--out", str(out),
                 "--check-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "Q4_0" in printed and "KLD 0.00e+00 / top-1 1.000 against the policy model" in printed
    assert json.loads((tmp_path / "m.gguf.report.json").read_text())["check"]["vs_policy"]["top1"] == 1.0
    for argv, message in (
            (["--out", str(out)], "exists: pass --force"),
            (["--out", str(tmp_path / "missing" / "m.gguf")], "does not exist"),
            (["--out", str(tmp_path / "n.gguf"), "--precision", "int4-g64"], "no exact GGML type"),
            (["--out", str(tmp_path / "n.gguf"), "--check-tokens", "1"], "--check-tokens"),
            (["--out", str(tmp_path / "n.gguf"), "--format", "onnx"], "invalid choice")):
        assert _cli(["export", "--model", "synthetic:tiny-llama", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "n.gguf").exists()


def _cli(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own usage errors exit from inside the parser
        return e.code


def test_engine_export_checks_what_it_wrote(tmp_path):
    engine = _engine()
    report = engine.export(tmp_path / "m.gguf", progress=False)
    assert report["check"]["vs_policy"]["top1"] == 1.0 and report["check"]["vs_policy"]["kld_mean"] < 1e-9
    with pytest.raises(InputError, match="gguf"):
        engine.export(tmp_path / "m.onnx", format="onnx")


def test_int8_in_groups_is_its_own_format_next_to_int8_blocks():
    from workbench.formats.packed import WEIGHT_FORMATS
    from workbench.policy import parse_precision
    g, block = parse_precision("int8-g32"), parse_precision("int8-block32")
    assert (g.format, g.group_size, g.label) == ("int8g", 32, "int8-g32") and block.label == "int8-block32"
    w = torch.randn(64, 96)
    store = WEIGHT_FORMATS.get("int8g").quantize(w, g)
    assert store.nbytes == WEIGHT_FORMATS.get("int8g").expected_bytes(g, (64, 96)) == 64 * 96 + 2 * 64 * 3
    from workbench.formats.quant import sqnr_db
    int4 = WEIGHT_FORMATS.get("int4").quantize(w, parse_precision("int4-g32"))
    assert sqnr_db(w, store.dequantize()) > sqnr_db(w, int4.dequantize()) + 20  # 4 more bits: ~24 dB


def test_a_gguf_file_is_a_model_and_a_damaged_one_is_one_line(tmp_path, monkeypatch, capsys):
    from workbench.errors import ModelError
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    engine = _engine()
    path = tmp_path / "m.gguf"
    gguf_export.export_gguf(engine, path, progress=False)
    back = Engine.from_pretrained(str(path), device="cpu")  # converted once, cached under the file's hash
    ids = torch.tensor([engine.tokenizer("a gguf file as the model")["input_ids"]])
    assert torch.equal(back.forward(ids), engine.forward(ids))
    assert back.tokenizer("a gguf file as the model")["input_ids"] == ids[0].tolist()
    assert Engine.from_pretrained(str(path), device="cpu").loaded.source == back.loaded.source
    assert main(["info", "--model", str(path)]) == 0 and "llama" in capsys.readouterr().out
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.gguf").write_text("not a model")
    for name, message in (("cut.gguf", "truncated or corrupt"), ("text.gguf", "not a GGUF file"),
                          ("absent.gguf", "not found")):
        with pytest.raises(ModelError, match=message):
            Engine.from_pretrained(str(tmp_path / name), device="cpu")
        assert main(["info", "--model", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_auto_mixture_of_exact_formats_exports_exactly(tmp_path):
    from workbench.formats.mixed_precision import with_auto_precision
    from workbench.formats.sensitivity import scan
    engine = _engine("none")
    sens = scan(engine, ["int4-g32", "int8-g32"], tokens=32, progress=False)
    engine.reconfigure(with_auto_precision(Policy.identity(), sens, budget_bits=6.0))
    report = gguf_export.export_gguf(engine, tmp_path / "m.gguf", progress=False)
    assert {"Q4_0", "Q8_0"} <= set(report["by_type"]) and not report["requantized"]  # a real mixture
    exported, policy = _read_back(engine, tmp_path / "m.gguf")
    assert torch.equal(exported, policy)
