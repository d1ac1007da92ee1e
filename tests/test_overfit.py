"""It learns: a handful of diagrams memorised in a bounded number of steps, with every
trainable part (projector, LoRA A and B, new-token embeddings) moving. The original repo's
overfittest.py, on tiny random-weight models."""

import random

import torch
from PIL import Image

import dsl
import model
import renderer
from conftest import tiny_config


def test_memorises_four_diagrams(tiny_llm_for_learning, tiny_clip):
    torch.manual_seed(0)
    config = tiny_config(tiny_llm_for_learning, tiny_clip, lora_dropout=0.0)
    reader = model.DiagramReader.build(config)
    vision = reader.vision
    rng = random.Random(0)
    diagrams = [dsl.sample_diagram(rng, num_elements=k) for k in (1, 2, 3, 4)]
    texts = [dsl.to_text(d) for d in diagrams]
    features = vision.encode([renderer.render(d, 64) for d in diagrams])[:, None]  # [4, 1 image, T, D]

    reader.projector.set_feature_statistics(features[:, 0])
    lora, rest = reader.trainable_parameters()
    before = {id(p): p.detach().clone() for p in lora + rest}
    optimizer = torch.optim.AdamW(lora + rest, lr=1e-2, weight_decay=0.0)
    batch = reader.collate(features, [[]] * 4, texts)

    for step in range(1, 301):
        reader.train()
        loss = reader(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            reader.eval()
            predictions, _ = reader.generate(features, [[]] * 4)
            if [dsl.is_valid(p) and dsl.parse(p) == d for p, d in zip(predictions, diagrams)] == [True] * 4:
                break
    else:
        raise AssertionError(f"not memorised in 300 steps; loss {loss.item():.4f}; last predictions {predictions}")

    # A trained model, shown pictures of noise, still writes valid DSL (constrained decoding).
    noise = torch.Generator().manual_seed(0)
    noise_images = [Image.fromarray((torch.rand(64, 64, 3, generator=noise) * 255).byte().numpy())
                    for _ in range(4)]
    texts, _ = reader.read_features(vision.encode(noise_images))
    assert all(dsl.is_valid(t) for t in texts)

    unchanged = [p.shape for p in lora + rest if torch.equal(before[id(p)], p.detach())]
    assert not unchanged, f"trainable tensors that never moved (no gradient reached them): {unchanged}"
    kinds = {"lora_A", "lora_B", "trainable_tokens"}
    names = {n for n, p in reader.llm.named_parameters() if p.requires_grad}
    assert all(any(k in n for n in names) for k in kinds)
