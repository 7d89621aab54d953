"""The one mapping from official Honeybee checkpoints (github.com/kakaobrain/honeybee) to this package's keys.

An official `pytorch_model.bin` holds `vision_model.vision_model.*` (CLIP), `abstractor.*` (C- or D-Abstractor)
and `language_model.*` (Llama). Every key is renamed by one explicit rule and its shape checked against our
model's state dict; anything left over, missing or the wrong shape raises a `ValueError` that names the key.
Nothing here loads files or touches a model: the functions map dicts of tensors to dicts of tensors.

    >>> ours = map_official_state_dict(official, model.state_dict())
    >>> model.load_state_dict(ours, strict=True)
"""


def _check_shape(official_key, tensor, our_key, target):
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(
            f"official key {official_key!r} has shape {tuple(tensor.shape)} but our {our_key!r} is "
            f"{tuple(target.shape)}; the checkpoint was built with another config than the model"
        )


def _check_complete(mapped, target_state_dict, prefix):
    missing = sorted(set(target_state_dict) - set(mapped))
    if missing:
        raise ValueError(f"the official checkpoint lacks {[prefix + k for k in missing]}, which our model needs")


def map_official_abstractor(state_dict, target_state_dict, prefix=""):
    """Official abstractor weights -> ours; keys are given without the `abstractor.` prefix.

    The submodule names of HoneybeeCAbstractor / HoneybeeDAbstractor are the official ones, so every key maps
    to itself, with one exception: Dec-2023 checkpoints built `pos_emb` (D-Abs: `v_pos_emb`) with N+1 slots
    for the CLS-inclusive features and dropped token 0 afterwards; slot 0 is dropped here, as the official
    `Projector._load_from_state_dict` does. `prefix` only makes error messages name full checkpoint keys.
    """
    mapped = {}
    for key, tensor in state_dict.items():
        if key not in target_state_dict:
            raise ValueError(f"official key {prefix + key!r} has no counterpart in our abstractor")
        target = target_state_dict[key]
        legacy = (
            key in ("pos_emb", "v_pos_emb")
            and tensor.dim() == 3
            and tensor.shape[1] == target.shape[1] + 1
            and (tensor.shape[0], tensor.shape[2]) == (target.shape[0], target.shape[2])
        )
        if legacy:
            tensor = tensor[:, 1:].clone()  # slot 0 was the legacy CLS position
        _check_shape(prefix + key, tensor, key, target)
        mapped[key] = tensor
    _check_complete(mapped, target_state_dict, prefix)
    return mapped


# One rule per top-level module: official prefix -> (our prefix, rule on the un-prefixed keys).
# The converter for full checkpoints adds `vision_model.` and `language_model.` here.
RULES = {
    "abstractor.": ("abstractor.", map_official_abstractor),
}


def map_official_state_dict(state_dict, model_state_dict):
    """A full (or partial, by prefix) official state dict -> ours, checked against `model_state_dict`.

    Each official key must fall under a prefix of `RULES`; each rule sees its keys without the prefix and
    the matching slice of `model_state_dict`. Our keys under a prefix the checkpoint lacks are missing.
    """
    groups = {}
    for key, tensor in state_dict.items():
        official_prefix = next((p for p in RULES if key.startswith(p)), None)
        if official_prefix is None:
            raise ValueError(f"official key {key!r} is under no known module prefix {sorted(RULES)}")
        groups.setdefault(official_prefix, {})[key[len(official_prefix) :]] = tensor
    mapped = {}
    for official_prefix, (our_prefix, rule) in RULES.items():
        target = {k[len(our_prefix) :]: v for k, v in model_state_dict.items() if k.startswith(our_prefix)}
        for key, tensor in rule(groups.get(official_prefix, {}), target, prefix=official_prefix).items():
            mapped[our_prefix + key] = tensor
    _check_complete(mapped, model_state_dict, "")
    return mapped


__all__ = ["map_official_abstractor", "map_official_state_dict"]
