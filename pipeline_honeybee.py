"""`pipeline("image-to-text", model=repo, trust_remote_code=True)` for Honeybee: captions, or answers with `prompt=`.

Registered in the model's config.json under `custom_pipelines`, which transformers 4 and 5 both consult before their
own tasks (5.x routes its built-in "image-to-text" to image-text-to-text, which needs text).
"""

from transformers import Pipeline

CAPTION_QUESTION = "Describe the image briefly."


class HoneybeeImageToTextPipeline(Pipeline):
    _load_processor = True  # the processor expands <image>; the tokenizer alone cannot
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self, prompt=None, text=None, max_new_tokens=None, generate_kwargs=None, timeout=None, **kwargs
    ):
        preprocess = {"prompt": prompt if prompt is not None else text}
        generate = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            generate["max_new_tokens"] = max_new_tokens
        return preprocess, {"generate_kwargs": generate}, {}

    def preprocess(self, image, prompt=None):
        inputs = self.processor(images=[image], text=prompt or CAPTION_QUESTION, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _forward(self, inputs, generate_kwargs=None):
        prompt_length = inputs["input_ids"].shape[1]
        return {"new_tokens": self.model.generate(**inputs, **(generate_kwargs or {}))[:, prompt_length:]}

    def postprocess(self, outputs):
        texts = self.processor.batch_decode(outputs["new_tokens"], skip_special_tokens=True)
        return [{"generated_text": t.strip()} for t in texts]


__all__ = ["CAPTION_QUESTION", "HoneybeeImageToTextPipeline"]
