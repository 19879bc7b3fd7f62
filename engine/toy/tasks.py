"""What `--data` and `--eval-data` name: an embedded task (generated here) or a data file.

    make_task   n generated problems of a split of an embedded task: `toy` (arithmetic.py),
                `shapes` (shapes.py: pictures) or `clips` (clips.py: video with sound);
                splits train, test, ood
    load_data   an embedded task's split, or a data file (data.load_examples) whose images,
                videos and audio clips are all checked to read (vision.check_media) before any
                training starts
"""
from data import TASKS, Example, load_examples
from engine import mer, vision
from engine.toy import arithmetic, chains, clips, shapes


def make_task(spec: str, split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n generated problems of an embedded task's split."""
    if spec == "shapes":
        return shapes.make_shapes(split, n, seed=seed)
    if spec == "clips":
        return clips.make_clips(split, n, seed=seed)
    if spec == "chains":
        return chains.make_chains(split, n, seed=seed)
    return arithmetic.make_toy(split, n, seed=seed)


def load_data(spec: str, split: str, *, n_toy: int, seed: int = 0, columns=None, need=(),
              fps: float = 2.0, audio_in_video: bool = False,
              rationales: str = "") -> list[Example]:
    """An embedded task (generated), a MER-UniBench directory (`mer-unibench:DIR[:SPLIT]`,
    engine/mer.py, with `rationales` joined by name) or a data file, whose media are checked
    (`fps`, `audio_in_video`: how its videos will be read)."""
    if spec in TASKS:
        return make_task(spec, split, n_toy, seed=seed)
    if spec.startswith(mer.PREFIX):
        examples = mer.load(spec, rationales=rationales, audio_in_video=audio_in_video)
    else:
        examples = load_examples(spec, columns=columns, need=need)
    vision.check_media(examples, fps=fps, audio_in_video=audio_in_video)
    return examples
