"""Hub folders: writing one that both transformers versions load with `trust_remote_code=True` (folder.py, used by
the converter, `honeybee-finetune` and `honeybee-quantize`), its model card (model_card.py), a model saved by this
package made into one (trained.py), and checking and uploading it (`honeybee-publish`, publish.py)."""
