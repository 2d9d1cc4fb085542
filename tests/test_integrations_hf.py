"""NiNo with the Hugging Face Trainer and accelerate: a tiny GPT-2 on CPU, gradient accumulation 2.

Period 10, ctx 5, 20 optimizer steps of 2 micro-batches each: NiNo must see 20 steps (one per
accumulated batch), nowcast at steps 9 and 19, and leave 18 steps to AdamW; the model runs 40
forward passes.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[integrations]'")
accelerate = pytest.importorskip("accelerate", reason="needs accelerate: pip install -e '.[integrations]'")

import nowcast  # noqa: E402
from nowcast.integrations import find_nino  # noqa: E402

STEPS, ACCUM, MICRO_BATCH, PERIOD, CTX, SEQ = 20, 2, 2, 10, 5, 16


class RecordingLinefitPlus(nowcast.LinefitPlus):
    """Linefit+ that also keeps each prediction it returns (to check that it was written)."""

    def __init__(self) -> None:
        super().__init__()
        self.predictions: list[torch.Tensor] = []

    def predict(self, graph, states, k):
        pred = super().predict(graph, states, k)
        self.predictions.append(pred.clone())
        return pred


class TokenData(torch.utils.data.Dataset):
    """Sequences counting up modulo the vocabulary from a random start (a learnable pattern)."""

    def __init__(self, n: int = STEPS * ACCUM * MICRO_BATCH, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(SEQ)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def trace_nowcasts(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict]:
    """After each nowcast step: the step, and the model's parameters (flat) right after it."""
    seen: list[dict] = []

    def hook(nino, args, kwargs):
        last = nino.state["last_nowcast"]
        if last is not None and last["step"] == nino.state["step"] - 1 and len(seen) < nino.state["nowcasts"]:
            seen.append({"step": last["step"], "k": last["k"],
                         "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()})
    opt.register_step_post_hook(hook)
    return seen


def base_steps(nino) -> set[int]:
    return {int(s["step"]) for s in nino.base_optimizer.state.values()}


def training_args(tmp_path, **kw):
    options = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=MICRO_BATCH,
                   gradient_accumulation_steps=ACCUM, learning_rate=3e-3, lr_scheduler_type="constant",
                   use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                   seed=0, dataloader_num_workers=0)
    return transformers.TrainingArguments(**(options | kw))


def check_run(nino, seen: list[dict], forwards: int, nowcaster: RecordingLinefitPlus) -> None:
    assert nino.state["step"] == STEPS
    assert nino.state["nowcasts"] == 2 and nino.state["nowcasts_rejected"] == 0
    assert [s["step"] for s in seen] == [PERIOD - 1, 2 * PERIOD - 1]
    assert base_steps(nino) == {STEPS - 2}  # AdamW stepped 18 times: every step but the two nowcasts
    assert forwards == STEPS * ACCUM
    assert len(nowcaster.predictions) == 2
    for s, pred in zip(seen, nowcaster.predictions):  # the prediction is what the model holds after
        assert torch.equal(s["params"], pred)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState); reset them."""
    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_trainer_with_the_wrapper(tmp_path):
    model = tiny_gpt2()
    forwards = count_forwards(model)
    nc = RecordingLinefitPlus()
    nino = nowcast.NiNo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), nc, period=PERIOD, ctx=CTX,
                        total_steps=STEPS)
    seen = trace_nowcasts(nino, model)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                                   optimizers=(nino, None))
    out = trainer.train()
    assert trainer.state.global_step == STEPS and find_nino(trainer.optimizer) is nino
    check_run(nino, seen, forwards[0], nc)
    assert out.training_loss < 4.1  # ln(64) = 4.16 at the start: it trained


def test_trainer_with_the_callback(tmp_path):
    from nowcast.integrations.hf import NowcastCallback

    model = tiny_gpt2()
    forwards = count_forwards(model)
    nc = RecordingLinefitPlus()
    cb = NowcastCallback(nc, period=PERIOD, ctx=CTX)

    class Hook(transformers.TrainerCallback):  # runs after cb, which builds NiNo at on_train_begin
        def on_train_begin(self, args, state, control, **kw):
            self.trace = trace_nowcasts(cb.nino, model)

    hook = Hook()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                                   callbacks=[cb, hook])
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert find_nino(trainer.optimizer) is cb.nino
    assert cb.nino.schedule.total_steps == STEPS  # from state.max_steps
    check_run(cb.nino, hook.trace, forwards[0], nc)


def test_accelerate_prepare_with_accumulation():
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model = tiny_gpt2()
    forwards = count_forwards(model)
    nc = RecordingLinefitPlus()
    nino = nowcast.NiNo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), nc, period=PERIOD, ctx=CTX,
                        total_steps=STEPS)
    seen = trace_nowcasts(nino, model)
    loader = torch.utils.data.DataLoader(TokenData(), batch_size=MICRO_BATCH, shuffle=False)
    pmodel, popt, ploader = accelerator.prepare(model, nino, loader)
    assert find_nino(popt) is nino and popt is not nino  # AcceleratedOptimizer around NiNo
    micro = 0
    for batch in ploader:
        with accelerator.accumulate(pmodel):
            loss = pmodel(**batch).loss
            accelerator.backward(loss)
            popt.step()       # a no-op on the first micro-batch of each pair
            popt.zero_grad()
        micro += 1
    assert micro == STEPS * ACCUM
    check_run(nino, seen, forwards[0], nc)


def test_trainer_checkpoint_resume_restores_the_schedule(tmp_path):
    """Stop at step 15 (mid-cycle, 2 states recorded), resume from the Trainer's checkpoint: NiNo
    continues with its history and nowcasts at step 19 as the uninterrupted run does."""
    def run(max_steps: int, resume: bool):
        model = tiny_gpt2()
        nino = nowcast.NiNo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), nowcast.LinefitPlus(),
                            period=PERIOD, ctx=CTX, total_steps=STEPS)
        args = training_args(tmp_path / "run", save_strategy="steps", save_steps=15, max_steps=max_steps)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(nino, None))
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-15") if resume else None)
        return nino

    first = run(15, resume=False)
    assert first.state["step"] == 15 and len(first.state["history"]) == 2 and first.state["nowcasts"] == 1
    saved = torch.load(tmp_path / "run" / "checkpoint-15" / "optimizer.pt", weights_only=True)
    assert saved["nino"]["step"] == 15 and len(saved["nino"]["history"]) == 2
    resumed = run(STEPS, resume=True)
    assert resumed.state["step"] == STEPS and resumed.state["nowcasts"] == 2
    assert resumed.state["last_nowcast"]["step"] == 2 * PERIOD - 1


def test_callback_refuses_a_second_wrapper(tmp_path):
    from nowcast.integrations.hf import NowcastCallback

    model = tiny_gpt2()
    nino = nowcast.NiNo(model, torch.optim.AdamW(model.parameters()), nowcast.LinefitPlus(), period=PERIOD,
                        ctx=CTX, total_steps=STEPS)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenData(),
                                   optimizers=(nino, None), callbacks=[NowcastCallback(nowcast.LinefitPlus())])
    with pytest.raises(RuntimeError, match="already a NiNo wrapper"):
        trainer.train()


def test_callback_resume_from_the_trainers_checkpoint(tmp_path):
    """With the callback, a resumed run reads NiNo's state from checkpoint-N/optimizer.pt; a
    checkpoint without it (saved before the callback was used) starts at the next cycle."""
    from nowcast.integrations.hf import NowcastCallback

    def run(max_steps: int, resume_from: str | None, callbacks: list, save_steps: int):
        model = tiny_gpt2()
        args = training_args(tmp_path / "run", save_strategy="steps", save_steps=save_steps, max_steps=max_steps)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume_from)

    cb = NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX, total_steps=STEPS)
    run(15, None, [cb], 15)
    assert cb.nino.state["step"] == 15 and len(cb.nino.state["history"]) == 2
    cb2 = NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX, total_steps=STEPS)
    run(STEPS, str(tmp_path / "run" / "checkpoint-15"), [cb2], 100)
    assert cb2.nino.state["step"] == STEPS and cb2.nino.state["nowcasts"] == 2  # 1 restored + step 19
    assert cb2.nino.state["last_nowcast"]["step"] == 2 * PERIOD - 1

    run(5, None, [], 5)  # plain AdamW checkpoint at step 5: no NiNo state in it
    cb3 = NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX, total_steps=STEPS)
    with pytest.warns(RuntimeWarning, match="restarts with the cycle at step 10"):
        run(STEPS, str(tmp_path / "run" / "checkpoint-5"), [cb3], 100)
    assert cb3.nino.state["step"] == STEPS and cb3.nino.state["nowcasts"] == 1
    assert cb3.nino.state["last_nowcast"]["step"] == 2 * PERIOD - 1
    assert base_steps(cb3.nino) == {STEPS - 1}  # 5 before the checkpoint + 14 after it
