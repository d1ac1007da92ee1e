"""Plumbing of model.py on tiny random-weight models: prompt layout, label masking, padding,
generation, checkpoints, PEFT compatibility."""

import random

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM

import checkpoint
import dsl
import language_model
import model
from conftest import tiny_config

T = 16  # patch tokens of the tiny ViT: (64 / 16) ** 2


def diagram_texts(n, seed=0):
    rng = random.Random(seed)
    return [dsl.to_text(dsl.sample_diagram(rng)) for _ in range(n)]


@pytest.fixture(scope="module")
def reader(tiny_llm, tiny_clip):
    torch.manual_seed(0)
    config = tiny_config(tiny_llm, tiny_clip, num_shots=1)
    r = model.DiagramReader.build(config)
    assert r.vision.feature_shape == (T, 64)
    perturb(r)  # LoRA B starts at zero: make the adapters, the projector and all do something
    return r.eval()


def test_patch_merge_concatenates_neighbouring_patches(tiny_llm, tiny_clip):
    tokens = model.VisionEncoder(tiny_config(tiny_llm, tiny_clip))(torch.rand(2, 3, 64, 64))  # a 4 x 4 grid, by rows
    blocks = model.merge_patches(tokens, 2)
    assert blocks.shape == (2, 4, 4 * 64)
    top_left = torch.cat([tokens[:, 0], tokens[:, 1], tokens[:, 4], tokens[:, 5]], dim=-1)
    bottom_right = torch.cat([tokens[:, 10], tokens[:, 11], tokens[:, 14], tokens[:, 15]], dim=-1)
    assert torch.equal(blocks[:, 0], top_left) and torch.equal(blocks[:, 3], bottom_right)
    assert torch.equal(model.merge_patches(tokens[:, None], 2)[:, 0], blocks)  # [B, images, T, D] alike
    # The projector merges: it takes the encoder's features and gives one token per block.
    projector = model.Projector("patch_mlp", (16, 64), 24, patch_merge=2)
    assert projector.feature_mean.shape == (4, 4 * 64) and projector(tokens).shape == (2, 4, 24)
    with pytest.raises(ValueError, match="does not divide"):
        model.Projector("patch_mlp", (16, 64), 24, patch_merge=3)
    with pytest.raises(ValueError, match="does not divide"):  # said when the settings are read
        tiny_config(tiny_llm, tiny_clip, patch_merge=3)


def test_patch_mlp_maps_every_patch_of_a_token_alike():
    """One shared map: a patch's code depends on its features, not on where it sits in the token."""
    torch.manual_seed(0)
    projector = model.Projector("patch_mlp", (16, 32), 24, patch_merge=2)
    features = torch.randn(1, 4, 4, 32)
    features[0, 2, 3] = features[0, 1, 0]  # one patch's features, at another token and place
    codes = projector.patch(projector.norm(features))
    assert torch.equal(codes[0, 2, 3], codes[0, 1, 0])
    assert projector.patch.in_features == 32 and projector(torch.randn(1, 16, 32)).shape == (1, 4, 24)


def test_new_tokens_are_single_tokens(reader):
    for token in language_model.new_tokens(dsl.TOKENS):
        assert len(reader.tokenizer(token, add_special_tokens=False).input_ids) == 1
    text = diagram_texts(1)[0]
    ids = reader.dsl_ids(text)
    assert ids[0] == reader.tokenizer.convert_tokens_to_ids(dsl.START) and ids[-1] == reader.end_id
    assert dsl.parse(reader.tokenizer.decode(ids)) == dsl.parse(text)


def test_few_shot_prompt_layout(reader):
    example = diagram_texts(1)[0]
    ids = reader.prompt_ids([example])
    image = [reader.image_start_id] + [model.IMAGE_SLOT] * T + [reader.image_end_id]
    n = len(reader.instruction_ids)
    assert ids[:n] == reader.instruction_ids
    assert ids[n:n + T + 2] == image
    assert ids[n + T + 2:-(T + 2)] == reader.dsl_ids(example)
    assert ids[-(T + 2):] == image
    assert reader.prompt_ids([])[n:] == image  # zero shots: the target image alone


def test_collate_left_pads_and_labels_only_the_target(reader):
    texts = diagram_texts(6)
    examples, targets = [[texts[0]], [texts[1]], [texts[2]]], texts[3:]
    images = torch.randn(3, 2, T, 64)
    batch = reader.collate(images, examples, targets)
    length = batch["input_ids"].shape[1]
    for i in range(3):
        n_real = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i].tolist() == [0] * (length - n_real) + [1] * n_real  # padding on the left
        labelled = batch["labels"][i][batch["labels"][i] != model.IGNORE].tolist()
        target_ids = reader.dsl_ids(targets[i])
        assert labelled == target_ids
        assert batch["labels"][i][-len(target_ids):].tolist() == target_ids  # at the very end
        assert batch["input_ids"][i][-len(target_ids):].tolist() == target_ids
        assert int((batch["input_ids"][i] == model.IMAGE_SLOT).sum()) == 2 * T


def test_embed_puts_projected_features_in_the_image_slots(reader):
    images = torch.randn(2, 2, T, 64)
    batch = reader.collate(images, [[t] for t in diagram_texts(2)])
    projected = reader.projector(images)
    embeddings = reader.embed(batch["input_ids"], projected)
    projected = projected.flatten(1, 2)
    for i in range(2):
        slots = batch["input_ids"][i] == model.IMAGE_SLOT
        assert torch.allclose(embeddings[i][slots], projected[i])
        token_ids = batch["input_ids"][i][~slots]
        assert torch.allclose(embeddings[i][~slots], reader.llm.get_input_embeddings()(token_ids))


# The tiny ViT's 4 x 4 token grid: the tokens over each quadrant, in dsl.POSITIONS order.
QUADRANT_TOKENS = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def reference_loss(reader, batch):
    """The loss the plain way: logits everywhere, shifted labels; each quadrant's class read
    by the head from the mean of its tokens, picked out by index."""
    embeddings = reader.embed(batch["input_ids"], reader.projector(batch["features"]))
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = reader.llm(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], position_ids=positions).logits
    labels = batch["labels"][:, 1:].flatten()
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=model.IGNORE,
                                              reduction="sum")
    tokens = reader.projector(batch["features"][:, -1])
    for q, indices in enumerate(QUADRANT_TOKENS):
        quadrant_logits = reader.projector.quadrant_head(tokens[:, indices].mean(dim=1))
        total = total + reader.config.quadrant_loss * torch.nn.functional.cross_entropy(
            quadrant_logits, batch["picture_labels"][:, q], reduction="sum")
    return total / (labels != model.IGNORE).sum()


def test_loss_on_kept_logits_equals_the_full_loss_and_ignores_padding(reader):
    texts = diagram_texts(8, seed=1)
    images = torch.randn(4, 2, T, 64)
    batch = reader.collate(images, [[t] for t in texts[:4]], texts[4:])
    assert batch["picture_labels"].tolist() == [dsl.quadrant_classes(dsl.parse(t)) for t in texts[4:]]
    with torch.no_grad():
        loss = reader(**batch)
        assert torch.allclose(loss, reference_loss(reader, batch), atol=1e-5)
        # Each sample alone (no padding) gives the same per-token losses.
        total, count = 0.0, 0
        for i in range(4):
            single = reader.collate(images[i:i + 1], [[texts[i]]], [texts[4 + i]])
            n = int((single["labels"] != model.IGNORE).sum())
            total += reader(**single).item() * n
            count += n
    assert loss.item() == pytest.approx(total / count, abs=1e-4)


def test_eager_attention_on_a_cpu_gives_the_fused_kernels_loss_and_generation(reader):
    images = torch.randn(3, 2, T, 64)
    texts = diagram_texts(6, seed=5)
    batch = reader.collate(images, [[t] for t in texts[:3]], texts[3:])  # rows of different lengths: padded
    with torch.no_grad():
        fused = reader.use_attention_for(torch.device("cuda"))(**batch)  # "sdpa": only the choice, no GPU needed
        fused_reading = reader.read_features(images[:, 1])
        eager = reader.use_attention_for(torch.device("cpu"))(**batch)
    assert reader.llm.config._attn_implementation == "eager"
    assert torch.allclose(fused, eager, atol=1e-5)
    texts, confidences = reader.read_features(images[:, 1])
    assert texts == fused_reading[0] and confidences == pytest.approx(fused_reading[1], rel=1e-4)


def test_batched_generation_equals_one_at_a_time(reader):
    texts = diagram_texts(4, seed=2)
    images = torch.randn(4, 2, T, 64)
    # Different example lengths make the prompts differ in length: real left padding.
    examples = [[texts[0]], [texts[1]], [texts[2]], [texts[3]]]
    batched = reader.generate(images, examples)[0]
    single = [reader.generate(images[i:i + 1], examples[i:i + 1])[0][0] for i in range(4)]
    assert batched == single
    assert len(set(batched)) > 1  # the image and example matter


def perturb(reader, seed=1):
    """Random values in every trainable tensor, as if trained."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in [*reader.trainable_parameters()[0], *reader.trainable_parameters()[1]]:
            p.add_(torch.randn_like(p) * 0.05)
        reader.projector.feature_mean.normal_()
        reader.projector.feature_std.uniform_(0.5, 2)


@pytest.mark.parametrize("untied", [False, True])
def test_save_and_load_give_identical_outputs(tmp_path, tiny_llm, tiny_llm_untied, tiny_clip, untied):
    config = tiny_config(tiny_llm_untied if untied else tiny_llm, tiny_clip, num_shots=1)
    reader = model.DiagramReader.build(config)
    vision = reader.vision
    perturb(reader)
    reader.eval()
    example_image = Image.new("RGB", (64, 64), "white")
    example_text = diagram_texts(1, seed=3)[0]
    reader.examples = [(example_image, example_text)]
    reader.save_pretrained(tmp_path)
    loaded = model.DiagramReader.from_pretrained(tmp_path)
    loaded_vision, examples = loaded.vision, loaded.examples
    loaded.eval()
    assert examples[0][1] == example_text
    pixels = torch.rand(3, 3, 64, 64)
    assert torch.equal(vision(pixels), loaded_vision(pixels))
    images = torch.randn(3, 2, T, 64)
    texts = diagram_texts(6, seed=4)
    batch = reader.collate(images, [[t] for t in texts[:3]], texts[3:])
    with torch.no_grad():
        assert torch.allclose(reader(**batch), loaded(**batch), atol=1e-6)
    assert reader.generate(images, [[t] for t in texts[:3]]) == loaded.generate(images, [[t] for t in texts[:3]])
    assert reader.read_features(images[:, 1]) == loaded.read_features(images[:, 1])  # with the saved example in the prompt


def test_adapter_folder_loads_with_plain_peft_onto_a_resized_base(tmp_path, tiny_llm_untied, tiny_clip):
    config = tiny_config(tiny_llm_untied, tiny_clip)
    reader = model.DiagramReader.build(config)
    perturb(reader)
    reader.save_pretrained(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000  # no whole embeddings

    base = AutoModelForCausalLM.from_pretrained(tiny_llm_untied)
    base.resize_token_embeddings(len(reader.tokenizer))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    reader.eval()
    new_ids = torch.tensor(reader.tokenizer.convert_tokens_to_ids(language_model.new_tokens(dsl.TOKENS)))
    ids = torch.cat([torch.tensor([1, 2, 3]), new_ids])[None]
    with torch.no_grad():
        ours = reader.llm(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_untied_models_train_the_output_rows_of_new_tokens(tiny_llm_untied, tiny_clip):
    config = tiny_config(tiny_llm_untied, tiny_clip)
    reader = model.DiagramReader.build(config)
    names = [n for n, p in reader.llm.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in names) and any("embed_tokens" in n for n in names)
    assert any("lora_A" in n for n in names)


def test_checkpoint_for_another_model_is_refused(tmp_path, tiny_llm, tiny_llm_untied, tiny_clip):
    import json
    config = tiny_config(tiny_llm, tiny_clip)
    reader = model.DiagramReader.build(config)
    reader.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    facts = json.loads((tmp_path / "base_models.json").read_text())
    saved["clip_seed"] = 1  # other random CLIP weights than the ones it was trained on
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(checkpoint.CheckpointError, match="CLIP weights"):
        model.DiagramReader.from_pretrained(tmp_path)
    saved["clip_seed"] = 0
    facts["llm_hidden_size"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "base_models.json").write_text(json.dumps(facts))
    with pytest.raises(checkpoint.CheckpointError, match="LLM hidden size is 4096"):
        model.DiagramReader.from_pretrained(tmp_path)
    facts["llm_hidden_size"] = 64
    (tmp_path / "base_models.json").write_text(json.dumps(facts))
    with pytest.raises(checkpoint.CheckpointError, match="LLM weights"):  # same shapes, other weights
        model.DiagramReader.from_pretrained(tmp_path, llm_name=tiny_llm_untied)
    with pytest.raises(checkpoint.CheckpointError, match="cannot load the base LLM"):
        model.DiagramReader.from_pretrained(tmp_path, llm_name=str(tmp_path / "no-such-model"))
    (tmp_path / "projector.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing projector.safetensors"):
        model.DiagramReader.from_pretrained(tmp_path)


def test_without_the_quadrant_loss_there_is_no_head_and_the_loss_is_the_dsl_alone(tmp_path, tiny_llm, tiny_clip):
    torch.manual_seed(0)
    with_head = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip))
    torch.manual_seed(0)
    without = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip, quadrant_loss=0.0))
    assert with_head.projector.quadrant_head is not None and without.projector.quadrant_head is None
    texts = diagram_texts(4, seed=2)
    images = torch.randn(2, 1, T, 64)
    batch = without.collate(images, [[], []], texts[:2])
    assert "picture_labels" not in batch
    with torch.no_grad():
        dsl_loss = without(**batch)
        assert torch.allclose(dsl_loss, with_head(**batch), atol=1e-6)  # the same weights, no quadrant labels
        assert with_head(**with_head.collate(images, [[], []], texts[:2])) > dsl_loss
    # A checkpoint without a head (quadrant_loss 0, or saved before the loss existed) loads, and
    # trains on without it, whatever quadrant_loss now defaults to.
    without.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(config_file.read_text().replace('"quadrant_loss": 0.0', '"quadrant_loss": 3.0'))
    loaded = model.DiagramReader.from_pretrained(tmp_path, trainable=True)
    assert loaded.projector.quadrant_head is None and "picture_labels" not in loaded.collate(images, [[], []], texts[:2])


def test_the_quadrant_loss_needs_a_grid_of_image_tokens(tiny_llm, tiny_clip):
    with pytest.raises(ValueError, match="quadrant_loss needs .* 1 token"):
        model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip, image_features="pooled"))
    model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip, image_features="pooled", quadrant_loss=0.0))


def noise_images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_constrained_decoding_writes_valid_dsl_even_untrained_and_on_noise(tiny_llm, tiny_clip):
    torch.manual_seed(0)
    reader = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip))  # untrained
    features = reader.vision.encode(noise_images(6))
    texts, confidences = reader.read_features(features, batch_size=4)
    assert [dsl.is_valid(t) for t in texts] == [True] * 6
    assert all(0 < c <= 1 for c in confidences)
    free, _ = reader.read_features(features, batch_size=4, constrained=False)
    assert not all(dsl.is_valid(t) for t in free)  # without the grammar an untrained model writes anything


def test_the_picture_check_is_the_picture_heads_probability_of_a_reading(tiny_llm, tiny_clip):
    torch.manual_seed(0)
    reader = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip))
    features = reader.vision.encode(noise_images(3))
    text = "<StartDiagram>\n  <Large> <Circle> <TopLeft>\n<EndDiagram>\n"
    checks = reader.picture_check(features, [text, text, "not a diagram"])
    projector = reader.projector.eval()
    with torch.no_grad():
        probabilities = projector.quadrant_logits(projector(features[:2])).float().softmax(-1)
    said = model.picture_targets(reader.language, [text])[0]
    for check, row in zip(checks, probabilities):  # the least, over the quadrants, of the class written there
        assert check == pytest.approx(float(row.gather(-1, said[:, None]).min()), abs=1e-6)
    assert checks[2] is None
    without_head = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip, quadrant_loss=0))
    assert without_head.picture_check(features, [text]) == [None]


@pytest.mark.parametrize("untied", [False, True])
def test_new_rows_apart_give_peft_s_outputs_and_gradients(tiny_llm, tiny_llm_untied, tiny_clip, untied):
    """language_model.new_rows_forward against PEFT's own trainable tokens: the same logits,
    and the same gradients for every trainable tensor, new rows included."""
    reader = model.DiagramReader.build(tiny_config(tiny_llm_untied if untied else tiny_llm, tiny_clip))
    perturb(reader)
    reader.eval()  # no dropout: both passes see the same adapters
    layers = language_model.trainable_token_layers(reader.llm)
    assert len(layers) == 2 and all("forward" in vars(m) for m in layers)  # the input and output sides
    new_id = reader.tokenizer.convert_tokens_to_ids(dsl.START)
    ids = torch.tensor([[new_id, 5, 9, reader.end_id], [7, new_id, new_id, 3]])

    def outputs_and_gradients():
        reader.llm.zero_grad()
        logits = reader.llm(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in reader.llm.named_parameters() if p.requires_grad}

    ours = outputs_and_gradients()
    language_model.with_peft_s_own_rows(reader.llm)
    assert not any("forward" in vars(m) for m in layers)
    theirs = outputs_and_gradients()
    assert torch.allclose(ours[0], theirs[0], atol=1e-5)
    assert ours[1].keys() == theirs[1].keys() and any("trainable_tokens" in n for n in ours[1])
    for name in ours[1]:
        assert torch.allclose(ours[1][name], theirs[1][name], atol=1e-6), name


def test_a_step_s_flops_depend_only_on_its_packed_sizes(reader):
    """finetune.py counts a step's FLOPs once per model.packed_sizes: batches of other lengths
    and padding but the same sizes must cost the same."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(batch):
        with FlopCounterMode(display=False) as counter:
            reader(**batch).backward()
        return counter.get_total_flops()

    batches = {}
    for seed in range(40):
        texts = diagram_texts(6, seed=seed)
        batch = reader.collate(torch.randn(3, 2, T, 64), [[t] for t in texts[:3]], texts[3:])
        real = (int(batch["attention_mask"].sum()), int((batch["labels"] != model.IGNORE).sum()))
        batches.setdefault(model.packed_sizes(batch["attention_mask"], batch["labels"]), {})[real] = batch
    same = next(group for group in batches.values() if len(group) > 1)
    counts = {flops(b) for b in same.values()}
    assert len(counts) == 1
    other = next(group for group in batches.values() if group is not same)
    assert flops(next(iter(other.values()))) not in counts
    reader.zero_grad()


def test_a_reading_s_flops_counted_call_by_call_equal_counting_all_of_it(reader):
    """finetune.py's validation counts its reading's FLOPs once per call shape of the reader's
    computing parts: the same total as counting every operation, at the first reading and the next."""
    import cost
    from torch.utils.flop_counter import FlopCounterMode

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(5)]
    with FlopCounterMode(display=False) as counter:
        reader.read_pictures(pictures, batch_size=3)
    run = cost.RunCost()
    for reading in range(2):
        with run.count_calls("validation", *reader.computing_parts()):
            reader.read_pictures(pictures, batch_size=3)
        assert run.phases["validation"]["flops"] == (reading + 1) * counter.get_total_flops() > 0
        if reading == 0:
            shapes = dict(run.by_shape)
    assert run.by_shape == shapes  # the second reading met no new shape: nothing counted again
    assert {key[1] for key in shapes} == {"VisionEncoder", "Projector", "LlamaForCausalLM"}
    assert all("forward" not in vars(part) for part in reader.computing_parts())  # the classes' own again


def test_a_reading_scored_teacher_forced_has_the_confidence_generation_gave_it(tiny_llm, tiny_clip):
    torch.manual_seed(0)
    reader = model.DiagramReader.build(tiny_config(tiny_llm, tiny_clip))
    features = reader.vision.encode(noise_images(3))
    texts, confidences = reader.read_features(features, batch_size=1)
    scores = reader.score_texts(features, texts)
    assert [least for _, least in scores] == pytest.approx(confidences, rel=1e-3)
    assert all(total <= np.log(least) + 1e-6 for total, least in scores)
    other = "<StartDiagram>\n  <Small> <Triangle> <BottomRight>\n<EndDiagram>\n"
    assert reader.score_texts(features[:1], [other])[0] != scores[0]
