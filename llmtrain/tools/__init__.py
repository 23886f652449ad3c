"""Post-training tools for the outputs of a fine-tuning run (a full model dir or a LoRA adapter dir).

* ``python -m llmtrain.tools.merge``: fold a LoRA adapter into its base model, checked on probe logits;
* ``python -m llmtrain.tools.chat``: talk to a model (one-shot or interactive) through its chat template;
* ``python -m llmtrain.tools.compare``: answer the same prompts with several models, as a Markdown table.

Weights are read from safetensors only and checkpoint-supplied code never runs.
"""
