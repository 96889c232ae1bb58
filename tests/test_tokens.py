"""Every path tokenizes as the model expects: a tokenizer that puts BOS before text (Llama 3, Gemma) gets
exactly its own ids, in prompts, chat, evaluation and calibration windows, LoRA data, the scheduler, the
scoring batcher and load-test prompts; a chat template that writes BOS is never given a second one."""
import pytest

from workbench import Engine
from workbench.corpus import token_windows
from workbench.synthetic import byte_tokenizer
from workbench.tokens import bos_id, encode_chat, encode_text

BOS = 256
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("synthetic:bos-llama", device="cpu")


def own_chat_ids(tokenizer, messages, generation=True):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_bos_is_detected_from_the_tokenizers_own_rule():
    assert bos_id(byte_tokenizer(bos=True)) == BOS
    assert bos_id(byte_tokenizer()) is None  # SmolLM2-like: no BOS
    assert encode_text(byte_tokenizer(), "hi") == byte_tokenizer()("hi")["input_ids"]


def test_prompt_ids_equal_the_tokenizers_own_for_text_and_chat(engine):
    tok = engine.tokenizer
    assert engine.token_ids(["hello world"], chat=False) == [tok("hello world")["input_ids"]]
    assert engine.token_ids(["hello world"], chat=False)[0][0] == BOS
    (chat,) = engine.token_ids([CHAT])
    assert chat == own_chat_ids(tok, CHAT) and chat.count(BOS) == 1  # the template's BOS, not a second
    assert engine.token_ids(["What is the capital of France?"]) == [chat]  # a string becomes one user turn
    batch = engine.encode(["a", "longer prompt"], chat=False)
    assert batch["input_ids"][0, -2:].tolist() == tok("a")["input_ids"]  # left padding keeps the BOS


def test_windows_start_with_bos_and_never_score_it():
    tok = byte_tokenizer(bos=True)
    text = "x" * 100
    windows = token_windows(tok, text, seq_len=32, max_tokens=1000)
    assert all(w[0] == BOS and (w[1:] != BOS).all() for w in windows)
    assert sum(len(w) - 1 for w in windows) == 100  # every text token is a target, the BOS none
    plain = token_windows(byte_tokenizer(), text, seq_len=32, max_tokens=1000)
    assert all(w[0] != BOS for w in plain) and sum(len(w) - 1 for w in plain) == 100 - 4  # first of each window


def test_evaluation_and_calibration_see_bos(engine, monkeypatch):
    from workbench import corpus
    from workbench.sparsity.calibrate import calibrate
    from workbench.evaluate import evaluate
    seen = []
    real = corpus.token_windows

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(out)
        return out
    monkeypatch.setattr("workbench.evaluate.token_windows", spy)
    monkeypatch.setattr("workbench.sparsity.calibrate.token_windows", spy)
    result = evaluate(engine, max_tokens=64, seq_len=32, progress=False)
    calibrate(engine, tokens=64, progress=False)
    assert result["tokens"] == 64 and seen and all(int(w[0]) == BOS for w in seen)


def test_lora_data_takes_the_models_ids(engine):
    from workbench.lora import load_examples
    text, conversation = "some training text", CHAT + [{"role": "assistant", "content": "Paris."}]
    a, b = load_examples(engine, ["some training text", conversation])
    assert a.ids == engine.tokenizer(text)["input_ids"]
    assert b.ids == own_chat_ids(engine.tokenizer, conversation, generation=False) and b.ids.count(BOS) == 1
    assert engine.tokenizer.decode([t for t in b.labels if t != -100]).startswith("Paris.")


def test_scheduler_batcher_and_loadtest_use_the_models_ids(engine):
    from workbench.batcher import DynamicBatcher
    from workbench import SamplingParams
    from workbench.loadtest import make_workload
    from workbench.scheduler import Scheduler
    with Scheduler(engine, max_num_seqs=2) as scheduler:
        request = scheduler.submit("hello", SamplingParams(max_new_tokens=2), chat=False)
        chat = scheduler.submit(CHAT, SamplingParams(max_new_tokens=2))
        request.result(30), chat.result(30)
    assert request.seq.prompt_ids == engine.tokenizer("hello")["input_ids"]
    assert chat.seq.prompt_ids == own_chat_ids(engine.tokenizer, CHAT)
    batcher = DynamicBatcher(engine)
    try:
        scored = batcher.score("hello there").result(30)
    finally:
        batcher.close()
    assert scored["tokens"][0] == "<s>" and scored["logprobs"][0] is None and len(scored["logprobs"]) == 12
    assert all(item.prompt_ids[0] == BOS for item in make_workload(engine.tokenizer, 4, float("inf")))


def test_encode_chat_without_a_template_is_plain_text():
    tok = byte_tokenizer()
    assert encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == \
        tok("a\nb")["input_ids"]
