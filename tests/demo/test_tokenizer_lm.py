"""The demo's BPE trainer (round trip through torchtune's tokenizer) and the
HF save of the pretrained LM (loaded back through medcap's checkpoint path)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medcap.demo._bpe import bpe_encode, pretokenize, train_bpe, vocab_ranks
from medcap.demo._lm import LMSizes, build_decoder, conversation, corpus_texts, save_hf
from medcap.demo._settings import DemoSettings
from medcap.demo._world import MODALITY_KEYS
from medcap.models import llama3_tokenizer, model_vocab_size, write_tiktoken_tokenizer


def test_bpe_counts_merges_by_hand():
    # "aaab" x3 and "ab" x2: the pair (a, b) occurs 5 times, (a, a) 6 times -> "aa" first
    merges = train_bpe(["aaab aaab aaab ab ab"], 2)
    assert merges[0] == b"aa"
    assert len(merges) == 2
    # nothing occurs twice: no merge at all
    assert train_bpe(["xyz"], 10) == []
    with pytest.raises(ValueError):
        train_bpe(["a"], -1)


def test_pretokenize_matches_llama3_split():
    from torchtune.models.llama3._tokenizer import CL100K_PATTERN
    import regex

    text = "CT scan showing a large bright nodule in the upper left region.\nQuestion: What's this? 123456"
    assert [p.decode() for p in pretokenize(text)] == regex.findall(CL100K_PATTERN, text)


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    texts = corpus_texts(MODALITY_KEYS, n=200)
    merges = train_bpe(texts, 200)
    paths = write_tiktoken_tokenizer(tmp_path_factory.mktemp("tok"), merges)
    tok = llama3_tokenizer(str(paths["path"]), str(paths["special_tokens_path"]))
    return tok, merges, texts


def test_round_trip_through_torchtune(demo_tokenizer):
    tok, merges, texts = demo_tokenizer
    ranks = vocab_ranks(merges)
    unseen = ["Ultrasound image showing a small dark cyst in the lower right region.",
              "Zebra-crossing ① naïve text 42, never seen."]
    for text in texts[:200] + unseen:
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert tok.decode(ids) == text
        # tiktoken's segmentation equals the trainer's own BPE rule
        assert ids == bpe_encode(text, ranks)
    # the merges pay off: a caption is far shorter than its bytes
    cap = texts[4]
    assert len(tok.encode(cap, add_bos=False, add_eos=False)) < len(cap.encode()) / 3
    # special tokens remapped right after the merges; the image id one past the vocabulary
    assert tok.image_id == model_vocab_size(256 + len(merges))
    assert max(tok.special_tokens.values()) == tok.image_id


def test_conversations_are_consistent():
    rng = np.random.default_rng(0)
    from medcap.demo._world import sample_finding

    for _ in range(50):
        f = sample_finding(rng, MODALITY_KEYS)
        desc = conversation("describe", f, rng)
        assert desc[1]["content"].startswith(f.modality_info.phrase)
        ans = conversation("answer", f, rng)
        assert ans[3]["content"] in ans[1]["content"] or ans[3]["content"] == f.modality_info.name
        ch = conversation("choose", f, rng)
        letter = ch[1]["content"]
        our = ch[0]["content"].split("Our answer: ")[1].split("\n")[0]
        assert f"\n{letter}. {our}\n" in ch[0]["content"]
    with pytest.raises(ValueError):
        conversation("sing", f, rng)


def test_hf_save_loads_back_with_equal_logits(tmp_path, demo_tokenizer):
    """The saved LM goes through torchtune's FullModelHFCheckpointer (medcap's loading
    path) into a MedcapModel and gives the same logits as the decoder that was saved."""
    from medcap.models import load_llama_weights, medcap_tiny

    tok, merges, _ = demo_tokenizer
    sizes = LMSizes(vocab_size=tok.image_id, num_layers=2, embed_dim=64, intermediate_dim=128, max_seq_len=64)
    torch.manual_seed(0)
    dec = build_decoder(sizes)
    with torch.no_grad():  # non-trivial norms, so a mixed-up key would show
        for name, p in dec.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    dec.eval()
    save_hf(dec, sizes, tmp_path / "llm")
    cfg = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert cfg["vocab_size"] == sizes.vocab_size and cfg["num_hidden_layers"] == 2

    model = medcap_tiny(vocab_size=sizes.vocab_size, image_token_id=tok.image_id, num_layers=2, num_heads=4,
                        num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=64)
    load_llama_weights(model, tmp_path / "llm", ["model.safetensors"])
    model.eval()
    tokens = torch.tensor([tok.encode("MRI scan showing a small dark mass in the upper left region.")])
    with torch.no_grad():
        want = dec(tokens)
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # and transformers reads the same weights to the same logits (an independent reference)
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "llm").eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-4)


def test_demo_generate_config_leaves_every_description_its_budget(tmp_path):
    """The reference's description budget counts the prompt with its special tokens
    spelled out, which the demo's small BPE spells in hundreds of tokens: the demo
    config's dataset_max_seq_len must still leave the full max_new_tokens for every
    vqa_type and question, or the descriptions come out empty (as they once did)."""
    from pathlib import Path
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from medcap.demo._bpe import build_tokenizer
    from medcap.demo._world import QUESTION_TYPES
    from medcap.eval._protocol import VQA_TYPES, description_budget

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "recipes" / "configs" / "demo" / "generate.yaml")
    build_tokenizer(tmp_path, DemoSettings().bpe_merges)
    tok = llama3_tokenizer(path=str(tmp_path / "tokenizer.model"),
                           special_tokens_path=str(tmp_path / "special_tokens.json"))
    engine = SimpleNamespace(tokenizer=tok, num_image_tokens=int(cfg.model.num_image_tokens))
    assert cfg.max_new_tokens == 40
    for vqa_type in VQA_TYPES:
        for _, _, question in QUESTION_TYPES:
            budget = description_budget(engine, vqa_type, question, max_seq_len=int(cfg.dataset_max_seq_len),
                                        max_new_tokens=int(cfg.max_new_tokens))
            assert budget == (0 if vqa_type == "omit" else 40), (vqa_type, question, budget)
