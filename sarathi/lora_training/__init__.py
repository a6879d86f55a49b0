"""LoRA training and merging (`sarathi lora train|merge`): PEFT adapters made with transformers'
Trainer (QLoRA on an NF4 or int4 base) and folded into their base. Serving adapters lives in
`sarathi.lora`, which never imports this package; this one may import the quantizer."""
