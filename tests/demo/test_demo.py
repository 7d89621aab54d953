"""The README's main job, examples/caption_demo.py: a tiny Honeybee taught the photos' captions with
`honeybee-finetune`, written as a Hub folder and read back through `trust_remote_code`, captions every photo as
taught through `pipeline("image-to-text")`."""

import importlib.util
import json

from honeybee_hf.train.data import HoneybeeConversationDataset
from utils import REPO
from utils.finetune import MIN_MARGIN, answer_margins, load_model, load_processor


def _demo():
    spec = importlib.util.spec_from_file_location("caption_demo", REPO / "examples" / "caption_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_captions_every_photo_as_taught(tmp_path, capsys):
    demo = _demo()
    learned = demo.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    # Wide teacher-forced margins first: the captions below then cannot flip on another CPU.
    trained = tmp_path / "run" / "model"
    model, processor = load_model(trained), load_processor(trained)
    dataset = HoneybeeConversationDataset(tmp_path / "captions.jsonl", processor, image_root=tmp_path / "photos")
    assert len(dataset) == len(demo.CAPTIONS)
    for index, sample in enumerate(dataset.samples):
        margins = answer_margins(model, dataset[index])
        assert margins.min() >= MIN_MARGIN, (sample.images, margins.tolist())
    assert learned == len(demo.CAPTIONS), printed
    for name, caption in demo.CAPTIONS.items():
        assert f"{name:>15}  ok  {caption!r:32}" in printed
    assert json.loads((trained / "config.json").read_text())["auto_map"]  # a Hub folder, loaded as remote code
