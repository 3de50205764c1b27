"""The metric implementations against hand-computed and reference values; greedy decoding and likelihoods against
plain transformers on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.eval import scores as M


def test_cider_d_matches_the_coco_reference_code():
    # Values printed by pycocoevalcap 1.2's Cider().compute_score on the same (tokenised) captions.
    hyps = ["a cat sits on the mat", "two dogs run in the park"]
    refs = [["the cat is on the mat", "a cat sat on a mat"],
            ["dogs are running in a park", "two dogs play in the grass"]]
    corpus, per_image = M.cider_d(hyps, refs)
    assert corpus == pytest.approx(2.46875)
    assert per_image == pytest.approx([2.9375, 2.0])
    # One image: every n-gram is in every reference set, so idf (log N/df) is 0 and so is CIDEr.
    assert M.cider_d(hyps[:1], refs[:1])[0] == 0.0
    # Tokenisation: case and punctuation do not matter, as with COCO's PTB tokeniser.
    assert M.cider_d(["A CAT sits, on the mat."], refs[:1]) == M.cider_d(hyps[:1], refs[:1])


def test_cider_d_rewards_consensus_and_penalises_length():
    refs = [["one red circle on the left"], ["two blue squares at the top"], ["three green triangles in the center"]]
    exact = M.cider_d([r[0] for r in refs], refs)[0]
    swapped = M.cider_d([refs[1][0], refs[0][0], refs[2][0]], refs)[0]
    padded = M.cider_d([r[0] + " and more and more words here" for r in refs], refs)[0]
    assert exact == pytest.approx(10.0) and swapped < exact / 2 and padded < exact


def test_cider_d_clips_repeated_ngrams_and_penalises_unequal_lengths():
    """Values derived by hand from the CIDEr-D definition (Vedantam et al. 2015; pycocoevalcap's CiderD): per n,
    tf-idf vectors g = count x (log N - log df); sim_n = sum min(g_hyp, g_ref) g_ref / (|g_hyp| |g_ref|) x
    exp(-(len_hyp - len_ref)^2 / (2 x 6^2)); score = 10 x mean over n = 1..4, averaged over references.
    N = 2 images, every n-gram in one image only, so each weighs log 2 per count and log 2 cancels out.
    Image A: hyp "red red red" (unigram count 3, clipped to the reference's 1), refs "red" and "red circle";
    its bigram "red red" and trigram are in neither reference: 0. Image B: "blue" against "blue"."""
    vs_red = (1 / 3) * math.exp(-(2**2) / 72)  # |g_hyp| = 3, |g_ref| = 1, overlap min(3, 1) x 1; length 3 vs 1
    vs_red_circle = (1 / (3 * math.sqrt(2))) * math.exp(-(1**2) / 72)  # |g_ref| = sqrt 2; length 3 vs 2
    image_a = 10 * (vs_red + vs_red_circle) / 2 / 4
    image_b = 10 * 1.0 / 4  # the unigram matches exactly; no bigrams or longer on either side
    corpus, per_image = M.cider_d(["red red red", "blue"], [["red", "red circle"], ["blue"]])
    assert per_image == pytest.approx([image_a, image_b], rel=1e-9)
    assert corpus == pytest.approx((image_a + image_b) / 2, rel=1e-9)
    # The case exercises both mechanisms: unclipped, A's unigram overlap would count 3 times; without the length
    # penalty its exp() factors would be 1.
    unclipped = 10 * (1.0 * math.exp(-4 / 72) + (1 / math.sqrt(2)) * math.exp(-1 / 72)) / 2 / 4
    no_penalty = 10 * (1 / 3 + 1 / (3 * math.sqrt(2))) / 2 / 4
    assert abs(per_image[0] - unclipped) > 0.5 and abs(per_image[0] - no_penalty) > 0.01


def test_bleu4_is_sacrebleu_corpus_bleu():
    assert M.bleu4(["one red circle on the left."], [["one red circle on the left."]]) == pytest.approx(100.0)
    assert M.bleu4(["completely unrelated words here"], [["one red circle on the left."]]) == pytest.approx(0.0)
    partial = M.bleu4(["one red circle on the right."], [["one red circle on the left."]])
    assert 0 < partial < 100
    # Several references, unequal counts per image.
    two = M.bleu4(["a b c d e", "f g h i j"], [["a b c d e", "x"], ["f g h i j"]])
    assert two == pytest.approx(100.0)


@pytest.mark.parametrize("pred,answer,hit", [("Two.", "two", True), ("2", "two", True), ("the red", "red", True),
                                             ("blue", "red", False), ("", "red", False),
                                             ("On the left", ["left", "on the left"], True)])
def test_vqa_exact_match_normalises_like_vqa(pred, answer, hit):
    assert M.vqa_exact_match([pred], [answer]) == float(hit)


def test_recall_at_k_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.1, 0.7, 0.6]])
    relevant = torch.eye(3, dtype=torch.bool)
    r = M.recall_at_k(sim, relevant, ks=(1, 2, 3))
    # query 0: rank 1; query 1: its target (0.3) is 2nd; query 2: its target (0.6) is 2nd
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}


def test_retrieval_counts_duplicate_captions_as_matches():
    keys = ["a", "a", "b"]
    sim = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.0, 0.1, 0.2]])
    out = M.retrieval_metrics(sim, keys, keys, ks=(1,))
    assert out["i2t_r1"] == 1.0  # image 0's best text is text 1, whose caption is the same
    assert out["chance_r1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)


def test_attribute_accuracy_uses_parse_caption():
    attrs = [{"shape": "circle", "color": "red", "count": 2, "position": "left"}] * 2
    acc = M.attribute_accuracy(["two red circles on the left.", "one blue circle at the top."], attrs)
    assert acc["color"] == 0.5 and acc["shape"] == 1.0 and acc["count"] == 0.5 and acc["position"] == 0.5
    assert acc["chance_mean"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 3 + 1 / 5) / 4)


@pytest.fixture(scope="module")
def tiny(assets, tokenizer):
    from pretrain.config import ModelConfig
    from pretrain.model.build import build_model, load_tokenizer
    from pretrain.model.vlm import VLMForTraining

    mcfg = ModelConfig(llm=str(assets["llama"]), vision=str(assets["clip"]))
    tok = load_tokenizer(mcfg)
    vlm = build_model(mcfg, tok)
    return VLMForTraining(vlm).eval(), tok


def test_greedy_generate_equals_transformers_generate(tiny):
    from pretrain.eval.greedy import caption_prompt, greedy_generate, question_prompt

    module, tok = tiny
    cfg = module.vlm.config
    prompts = [caption_prompt(tok, cfg.image_token_id, cfg.image_seq_length),
               question_prompt(tok, cfg.image_token_id, cfg.image_seq_length, "what color is the shape?"),
               question_prompt(tok, cfg.image_token_id, cfg.image_seq_length, "where?")]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    torch.manual_seed(0)
    px = torch.randn(3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    ours = greedy_generate(module, prompts, px, tok.eos_token_id, max_new_tokens=6)
    for prompt, image, got in zip(prompts, px, ours):
        ids = torch.tensor([prompt])
        ref = module.vlm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image[None],
                                  max_new_tokens=6, do_sample=False, use_cache=True, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert got == ref


def test_likelihood_similarity_equals_the_training_loss(tiny):
    from pretrain.bench.device_check import per_token_loss
    from pretrain.eval.greedy import caption_prompt
    from pretrain.eval.retrieval import image_features, likelihood_similarity

    module, tok = tiny
    cfg = module.vlm.config
    prompt = caption_prompt(tok, cfg.image_token_id, cfg.image_seq_length)
    texts = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
             for t in ("one red circle on the left.", "three blue squares at the top.")]
    torch.manual_seed(1)
    px = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    sim = likelihood_similarity(module, image_features(module, px), texts, prompt, batch_size=1)
    for i in range(2):
        for j in range(2):
            ids = torch.tensor([prompt + texts[j]])
            labels = torch.tensor([[-100] * len(prompt) + texts[j]])
            batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                     "pixel_values": px[i : i + 1], "sample_lengths": [[ids.shape[1]]]}
            with torch.no_grad():
                mean_nll = per_token_loss(module, batch).sum() / len(texts[j])
            assert sim[i, j].item() == pytest.approx(-mean_nll.item(), abs=1e-4)
    assert math.isfinite(sim.sum().item())


def test_eval_command_reports_usage_errors(tmp_path, capsys):
    import yaml

    from pretrain.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"llm": "x", "vision": "y"}, "train": {"max_steps": 1},
                                   "data": {"train": [{"urls": "a.tar"}], "val": [{"urls": "b.tar"}]}}))
    assert main(["eval", str(cfg), "--checkpoint", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such checkpoint" in capsys.readouterr().out
    assert main(["eval", str(cfg), "--checkpoint", str(tmp_path), "--tasks", "loss,bleu"]) == 2
    assert "unknown ['bleu']" in capsys.readouterr().out
    assert main(["eval", str(cfg), "--checkpoint", str(tmp_path), "objectives.itm_weight=-1"]) == 2
    assert "objectives.itm_weight" in capsys.readouterr().out


def test_the_validation_loop_sums_token_losses_over_batches_and_measures_the_image_gap(tiny):
    from pretrain.train.validation import validation_metrics

    module, tok = tiny
    cfg = module.vlm.config
    prompt = [tok.bos_token_id] + [cfg.image_token_id] * cfg.image_seq_length
    torch.manual_seed(2)
    batches = []
    for words in (("one red circle.", "two blue squares at the top."), ("a green star.", "three small dots."),
                  ("never read: past max_batches.", "never read either.")):
        texts = [tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for w in words]
        width = len(prompt) + max(len(t) for t in texts)
        ids, labels = torch.full((2, width), tok.pad_token_id), torch.full((2, width), -100)
        mask = torch.zeros((2, width), dtype=torch.long)
        for row, t in enumerate(texts):
            ids[row, : len(prompt) + len(t)] = torch.tensor(prompt + t)
            labels[row, len(prompt) : len(prompt) + len(t)] = torch.tensor(t)
            mask[row, : len(prompt) + len(t)] = 1
        px = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px,
                        "sample_lengths": [[len(prompt) + len(t)] for t in texts]})
    module.train()
    got = validation_metrics(module, iter(batches), torch.device("cpu"), max_batches=2, image_ablation=True)
    assert module.training  # put back in the mode it was in
    module.eval()
    with torch.no_grad():
        sums = [module(b) for b in batches[:2]]
        rolled = [module({**b, "pixel_values": b["pixel_values"].roll(1, dims=0)})[0] for b in batches[:2]]
    count = sum(int(n) for _, n in sums)
    assert got["batches"] == 2 and count > 4
    assert got["loss"] == pytest.approx(sum(s.item() for s, _ in sums) / count, rel=1e-6)  # a mean over tokens
    assert got["loss_shuffled_images"] == pytest.approx(sum(r.item() for r in rolled) / count, rel=1e-6)
    assert got["image_gap"] == pytest.approx(got["loss_shuffled_images"] - got["loss"]) and got["image_gap"] != 0
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
