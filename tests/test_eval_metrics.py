"""lmclean.eval: each metric against a value computed by hand, scoring against a manual forward pass."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig

from lmclean.errors import DataError, InputNotFoundError, ModelMismatchError
from lmclean.eval import distance, metrics, scoring, tofu

LN = math.log


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("members", "nonmembers", "expected"),
    [
        ([3, 2, 2], [2, 1], 5 / 6),  # pairs: 3>2, 3>1, 2=2 (1/2), 2>1, 2=2 (1/2), 2>1 -> 5 of 6
        ([5, 6], [1, 2, 3], 1.0),
        ([1], [2, 3], 0.0),
        ([1, 1], [1], 0.5),
    ],
)
def test_roc_auc_hand_ranking(members: list[float], nonmembers: list[float], expected: float) -> None:
    assert metrics.roc_auc(members, nonmembers) == pytest.approx(expected)
    u = stats.mannwhitneyu(members, nonmembers).statistic
    assert metrics.roc_auc(members, nonmembers) == pytest.approx(u / (len(members) * len(nonmembers)))


def test_roc_auc_refuses_empty_and_nan() -> None:
    with pytest.raises(DataError, match="member_scores"):
        metrics.roc_auc([], [1.0])
    with pytest.raises(DataError, match="NaN"):
        metrics.roc_auc([1.0], [float("nan")])


def test_mia_scores_by_hand() -> None:
    lp = [-1.0, -5.0, -2.0, -8.0, -0.5]
    assert metrics.loss_score(lp) == pytest.approx(-16.5 / 5)
    assert metrics.min_k_prob_score(lp, k=0.4) == pytest.approx((-8.0 - 5.0) / 2)  # 2 lowest of 5
    assert metrics.min_k_prob_score(lp, k=0.2) == pytest.approx(-8.0)
    assert metrics.min_k_prob_score(lp, k=0.01) == pytest.approx(-8.0)  # at least one token
    assert len(zlib.compress(b"aaaa")) == 12  # 2-byte header, 6-byte deflate block, 4-byte Adler-32
    assert metrics.zlib_score([-1.0, -3.0], "aaaa") == pytest.approx(-2.0 / 12)
    assert metrics.MIA_ATTACKS["zlib"]([-1.0, -3.0], "aaaa") == pytest.approx(-2.0 / 12)
    with pytest.raises(DataError, match="k must be"):
        metrics.min_k_prob_score(lp, k=0.0)


def test_mia_auc_and_privleak() -> None:
    members = [np.array([-0.5, -0.25]), np.array([-0.75])]  # binary-exact, so the tie is a tie
    nonmembers = [np.array([-2.0]), np.array([-0.5, -1.0])]  # loss scores -0.375, -0.75 vs -2, -0.75
    assert metrics.mia_auc(members, nonmembers, metrics.loss_score) == pytest.approx(3.5 / 4)
    assert metrics.privleak(0.6, 0.5) == pytest.approx(0.2)
    with pytest.raises(DataError, match="auc_reference"):
        metrics.privleak(0.6, 0.0)


def test_truth_ratio_two_token_answers() -> None:
    # perturbed answers of two tokens with probs (.5, .5) and (.25, .25); paraphrase (.8, .2)
    pert = [(LN(0.5) + LN(0.5)) / 2, (LN(0.25) + LN(0.25)) / 2]
    para = (LN(0.8) + LN(0.2)) / 2
    expected = math.sqrt(0.5 * 0.25) / math.sqrt(0.8 * 0.2)  # geometric mean over perturbed / P_para^(1/2)
    assert metrics.truth_ratio(pert, para) == pytest.approx(expected)  # 0.35355 / 0.4 = 0.88388
    assert metrics.truth_ratio_utility([expected, 2.0]) == pytest.approx((1 - expected + 0.0) / 2)
    assert metrics.truth_ratio_forget([0.5, 4.0]) == pytest.approx((0.5 + 0.25) / 2)


def test_forget_quality_is_the_ks_p_value() -> None:
    a, b = [0.1, 0.4, 0.35, 0.8, 1.2], [0.5, 0.9, 1.1, 1.5, 0.7, 2.0]
    assert metrics.forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert metrics.forget_quality(a, a) == pytest.approx(1.0)  # identical samples: D = 0
    # fully separated 3 vs 3: D = 1, reached by 2 of the C(6,3) = 20 orderings -> p = 0.1
    assert metrics.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_rouge_l_recall_by_hand() -> None:
    # LCS of "the cat on mat" in "the cat sat on the mat" is 4 of the reference's 6 tokens
    assert metrics.rouge_l_recall("the cat on mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert metrics.rouge_l_recall("Cats!", "cat") == pytest.approx(1.0)  # lower-cased, stemmed


def test_probabilities_and_model_utility() -> None:
    assert metrics.answer_probability([LN(0.5), LN(0.25)]) == pytest.approx(0.375)
    assert metrics.normalised_choice_probability(LN(0.5), [LN(0.25), LN(0.25)]) == pytest.approx(0.5)
    assert metrics.model_utility([0.5, 0.5, 1.0]) == pytest.approx(3 / (2 + 2 + 1))
    assert metrics.model_utility([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(DataError, match=">= 0"):
        metrics.model_utility([0.5, -0.1])


# ----------------------------------------------------------------------------- distance


def test_residual_ratio_on_tiny_dicts() -> None:
    ref = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    orig = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0])}  # 5 from ref
    hat = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.5])}  # 2.5 from ref
    assert distance.param_distance(orig, ref) == pytest.approx(5.0)
    assert distance.residual_ratio(hat, orig, ref) == pytest.approx(0.5)
    assert distance.residual_ratio(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0])) == pytest.approx(0.5)
    with pytest.raises(ModelMismatchError, match="'b' is in theta_hat but not in theta_ref"):
        distance.residual_ratio(hat, orig, {"w": ref["w"]})
    with pytest.raises(ModelMismatchError, match=r"'w': shape \(3,\) in theta_hat vs \(2,\)"):
        distance.residual_ratio({"w": torch.zeros(3), "b": ref["b"]}, orig, ref)
    with pytest.raises(DataError, match="undefined"):
        distance.residual_ratio(hat, ref, ref)


# ----------------------------------------------------------------------------- scoring


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


@pytest.fixture(scope="module")
def lm() -> tuple[torch.nn.Module, ByT5Tokenizer]:
    return _tiny_model(0), ByT5Tokenizer()


PROMPTS = ["Q: hi\nA: ", "Q: a longer question?\nA: ", "Q: x\nA: "]
ANSWERS = ["yes", "no, not at all", "maybe so"]


def _manual_logprobs(model: torch.nn.Module, tok: ByT5Tokenizer, prompt: str, answer: str) -> np.ndarray:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0]  # (T, V)
    lp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
    return lp[torch.arange(len(a)), torch.tensor(a)].double().numpy()


def test_score_texts_matches_manual_forward(lm: tuple[torch.nn.Module, ByT5Tokenizer]) -> None:
    model, tok = lm
    model.train()
    scored = scoring.score_texts(model, tok, PROMPTS, ANSWERS, batch_size=3)
    assert model.training  # the caller's mode is restored
    model.eval()
    for s, p, a in zip(scored, PROMPTS, ANSWERS):
        manual = _manual_logprobs(model, tok, p, a)
        assert s.n_tokens == len(a.encode()) and s.token_logprobs.shape == manual.shape
        np.testing.assert_allclose(s.token_logprobs, manual, rtol=1e-5, atol=1e-6)
        assert s.logprob_sum == pytest.approx(manual.sum(), rel=1e-5)
    single = scoring.score_texts(model, tok, PROMPTS, ANSWERS, batch_size=1)  # no padding at all
    for s1, s3 in zip(single, scored):
        np.testing.assert_allclose(s1.token_logprobs, s3.token_logprobs, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="answer 0"):
        scoring.score_texts(model, tok, ["Q"], [""])


def test_score_full_texts_and_scorer(lm: tuple[torch.nn.Module, ByT5Tokenizer]) -> None:
    model, tok = lm
    full = scoring.score_full_texts(model, tok, ["hello world", "ab"], batch_size=2)
    np.testing.assert_allclose(full[0].token_logprobs, _manual_logprobs(model, tok, "h", "ello world"), atol=1e-6)
    assert full[1].n_tokens == 1
    means = scoring.make_scorer(model, tok, batch_size=2)(PROMPTS, ANSWERS)
    assert means[1] == pytest.approx(_manual_logprobs(model, tok, PROMPTS[1], ANSWERS[1]).mean(), rel=1e-5)


def test_greedy_answers_match_a_manual_argmax_loop(lm: tuple[torch.nn.Module, ByT5Tokenizer]) -> None:
    model, tok = lm
    model.eval()
    expected = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == 1:  # eos
                break
        expected.append(tok.decode(new, skip_special_tokens=True).split("\n", 1)[0].strip())
    assert scoring.greedy_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3) == expected


def test_mean_token_kl(lm: tuple[torch.nn.Module, ByT5Tokenizer]) -> None:
    model, tok = lm
    other = _tiny_model(1).eval()
    assert scoring.mean_token_kl(model, model, tok, PROMPTS, ANSWERS) == pytest.approx(0.0, abs=1e-12)
    kls = []
    for p, a in zip(PROMPTS, ANSWERS):
        ids = tok(p + a, add_special_tokens=False)["input_ids"]
        n_p = len(tok(p, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, n_p - 1 : -1].double(), -1)
            lq = torch.log_softmax(other(torch.tensor([ids])).logits[0, n_p - 1 : -1].double(), -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
    expected = float(torch.cat(kls).mean())
    assert scoring.mean_token_kl(model, other, tok, PROMPTS, ANSWERS, batch_size=2) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- TOFU


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pert(i: int, n_pert: int = 2) -> dict:
    return {
        "question": f"q{i}", "answer": f"a{i}", "paraphrased_answer": f"pa{i}",
        "perturbed_answer": [f"w{i}_{j}" for j in range(n_pert)], "paraphrased_question": f"pq{i}",
    }  # fmt: skip


@pytest.fixture
def tofu_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "full.jsonl", [{"id": i, "question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    for split, k in [("forget01", 1), ("forget05", 2), ("forget10", 3)]:
        _write(tmp_path / f"{split}_perturbed.jsonl", [_pert(i) for i in range(10 - k, 10)])
    _write(tmp_path / "retain_perturbed.jsonl", [_pert(0), _pert(1)])
    for split in tofu.HOLDOUT_SPLITS:
        _write(tmp_path / f"{split}.jsonl", [{"question": "hq", "answer": "ha"}])
    for name in ("real_authors", "world_facts"):
        rows = [{"question": f"{name}{i}", "answer": f"r{i}", "perturbed_answer": [f"x{i}", f"y{i}"]} for i in range(2)]
        _write(tmp_path / f"{name}_perturbed.jsonl", rows)
    return tmp_path


def test_load_tofu(tofu_dir: Path) -> None:
    data = tofu.load_tofu(tofu_dir)
    assert len(data.full) == 10 and data.full[3] == tofu.QA("q3", "a3")
    assert data.forget_ids("forget05") == range(8, 10)
    assert data.forget["forget10"][0].perturbed_answers == ("w7_0", "w7_1")
    assert data.retain[1].base_answer == "pa1"
    assert data.real_authors[0].paraphrased_answer is None and data.real_authors[0].base_answer == "r0"
    assert data.holdout["holdout05"] == (tofu.QA("hq", "ha"),)


def test_load_tofu_errors_name_file_and_line(tofu_dir: Path) -> None:
    rows = [_pert(8), _pert(9)]
    del rows[1]["paraphrased_answer"]
    _write(tofu_dir / "forget05_perturbed.jsonl", rows)
    with pytest.raises(DataError, match=r"forget05_perturbed\.jsonl:2: missing field 'paraphrased_answer'"):
        tofu.load_tofu(tofu_dir)
    _write(tofu_dir / "forget05_perturbed.jsonl", [_pert(7), _pert(9)])
    with pytest.raises(DataError, match="different question"):
        tofu.load_tofu(tofu_dir)
    (tofu_dir / "forget05_perturbed.jsonl").unlink()
    with pytest.raises(InputNotFoundError, match="forget05_perturbed.jsonl"):
        tofu.load_tofu(tofu_dir)


def test_tofu_metrics_from_a_fake_scorer(tofu_dir: Path) -> None:
    data = tofu.load_tofu(tofu_dir)
    # mean per-token log-prob by answer: gold 0.5, paraphrase 0.4, wrong answers 0.2 (as probabilities)
    table = {"a": LN(0.5), "r": LN(0.5), "p": LN(0.4), "w": LN(0.2), "x": LN(0.2), "y": LN(0.2)}
    prompts_seen: list[str] = []

    def score(prompts: list[str], answers: list[str]) -> list[float]:
        prompts_seen.extend(prompts)
        return [table[a[0]] for a in answers]

    scores = tofu.score_split(data.retain, score)
    assert prompts_seen[0] == "Q: q0\nA: "
    np.testing.assert_allclose(tofu.split_truth_ratios(scores), [0.5, 0.5])  # 0.2 / 0.4
    assert tofu.split_probability(scores, multiple_choice=False) == pytest.approx(0.5)
    comps = tofu.model_utility_components(data, score, lambda ps: ["a0" if "q0" in p else "zz" for p in ps])
    assert comps["retain_rouge_l_recall"] == pytest.approx(0.5)  # one of two answers reproduced
    assert comps["real_authors_probability"] == pytest.approx(0.5 / (0.5 + 0.2 + 0.2))
    assert comps["world_facts_truth_ratio"] == pytest.approx(1 - 0.2 / 0.5)  # base = gold answer
    assert comps["retain_truth_ratio"] == pytest.approx(0.5)
    assert len(comps) == 9
    assert metrics.model_utility(comps.values()) == 0.0  # real authors' ROUGE is 0
