"""Tools beside the recipe's four scripts, each run from the repo's root as a module:

    python -m tools.check            one step of each part: will this configuration run here?
    python -m tools.benchmark        the training step's FLOPs, speed and share of the matmul peak
    python -m tools.memory           a step's peak memory at full depth, from a few layers
    python -m tools.robustness       a checkpoint's scores on each kind of damaged picture
    python -m tools.other_renderer   pictures from a second, independent renderer
    python -m tools.other_mermaid    held-out Mermaid charts in a second style, drawn by code of its own
    python -m tools.real_pictures    held-out diagrams as people bring them: sketch, photo, margins, dark; scored
    python -m tools.learning_curve   validation scores against images seen, from runs' log.jsonl
    python -m tools.vision_probe     what the image tokens say, read by the quadrant head alone (no LLM)
    python -m tools.llm_probe        the LLM side alone (Mermaid): image tokens built from the text, not CLIP
    python -m tools.sketchpad        the page's sketchpad in chromium: diagrams drawn with the mouse, read
    python -m tools.grammar_cost     what decoding by the DSL's grammar costs, a share of a generation step
    python -m tools.gpu_proof        the reference configuration's path on a CUDA GPU
"""
