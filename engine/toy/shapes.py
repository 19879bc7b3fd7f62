"""The embedded image task (`--data shapes`): count the shapes of one colour in a picture.

The vision-language counterpart of the arithmetic toy task (data.py), for the tiny Qwen3-VL
(`models.toy_vlm`): everything runs offline on a laptop CPU. A picture is a 3 x 3 grid of
32-pixel cells, 96 x 96 pixels, so that each cell is exactly one image token of the model
(16-pixel patches, 2 x 2 merged). A cell is empty or holds a square, disc or triangle, big or
small, in red, green, blue or yellow (r, g, b, y). The question is a colour; the worked solution
lists the cells (1-9, reading order) that hold a shape of that colour, then their number:

    picture + "Qr"   ->   "159=3"        answer 3

Privileged contexts (every kind an algorithm may show its teacher):
  answer     "3"
  solution   "159=3"
  hint       the rows that hold the colour, "13": a region, answer-free (for real data a
             PTD-PO hint names regions as text, e.g. normalised boxes; README)
  rationale  how many shapes the picture holds in all: answer-free context

The warm start imitates a demonstrator that, shown only the question, overlooks most shapes in
the right-hand column (cells 3, 6, 9: `careless_solution`) and, shown a context, looks
carefully: the same situation as the arithmetic task's dropped carries, a habit that only a
reward corrects. Train and test pictures hold 2-6 shapes, the out-of-distribution split 7-9.
Problems go to train or test by a hash of the picture and question.
"""
import functools
import hashlib
import io
import random

import torch

from data import Example
from engine.toy.splits import draw_split, probe_heads, train_probes

COLOURS = {"r": (215, 40, 40), "g": (30, 160, 60), "b": (40, 70, 215), "y": (225, 190, 30)}
KINDS = ("square", "disc", "triangle")
CELL, GRID = 32, 3
RIGHT_COLUMN = (3, 6, 9)
CHARS = "rgby"  # the colours' letters, added to the arithmetic task's characters


def draw(cells: list) -> bytes:
    """PNG bytes of the picture: `cells` holds GRID * GRID entries, None or
    (colour, kind, big, dx, dy) with the shape's offset in pixels from the cell's centre."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (CELL * GRID, CELL * GRID), (255, 255, 255))
    pen = ImageDraw.Draw(im)
    for k, c in enumerate(cells):
        if c is None:
            continue
        colour, kind, big, dx, dy = c
        r = 11 if big else 6
        x, y = (k % GRID) * CELL + CELL // 2 + dx, (k // GRID) * CELL + CELL // 2 + dy
        box = (x - r, y - r, x + r, y + r)
        fill = COLOURS[colour]
        if kind == "square":
            pen.rectangle(box, fill=fill)
        elif kind == "disc":
            pen.ellipse(box, fill=fill)
        else:
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def solution_of(cells: list, colour: str, skip=None) -> str:
    """The listed cells of `colour`, then their number. `skip(cell)`, when given, is asked at
    each one whether to overlook it (a careless demonstrator)."""
    found = [str(k + 1) for k, c in enumerate(cells) if c is not None and c[0] == colour
             and not (skip and skip(k + 1))]
    return "".join(found) + "=" + str(len(found))


def shapes_example(rng: random.Random, n_shapes: int) -> tuple[Example, list]:
    """(example, cells) of one random picture with n_shapes shapes."""
    cells = [None] * (GRID * GRID)
    for k in rng.sample(range(GRID * GRID), n_shapes):
        big = rng.random() < 0.5
        jitter = 3 if big else 8
        cells[k] = (rng.choice(CHARS), rng.choice(KINDS), big,
                    rng.randint(-jitter, jitter), rng.randint(-jitter, jitter))
    present = sorted({c[0] for c in cells if c is not None})
    colour = rng.choice(present) if rng.random() < 0.9 else rng.choice(CHARS)  # 10%: maybe 0
    solution = solution_of(cells, colour)
    rows = sorted({str(k // GRID + 1) for k, c in enumerate(cells) if c and c[0] == colour})
    ex = Example(prompt=colour, answer=solution.split("=")[1], solution=solution,
                 hint="".join(rows), rationale=str(n_shapes), images=[draw(cells)])
    return ex, cells


def careless_solution(ex: Example, rng: random.Random, p: float) -> str:
    """The careless demonstrator's solution: each shape of the colour in the right-hand column
    is overlooked with probability p (the cells come back from the listed solution)."""
    listed = ex.solution.split("=")[0]
    kept = [d for d in listed if not (int(d) in RIGHT_COLUMN and rng.random() < p)]
    return "".join(kept) + "=" + str(len(kept))


def _split_of(ex: Example) -> str:
    h = hashlib.sha256(ex.images[0] + ex.prompt.encode()).digest()
    return "test" if h[0] % 10 == 0 else "train"


@functools.lru_cache(maxsize=8)  # drawn once per process (20,000 pictures: ~10 s)
def make_shapes(split: str, n: int, *, seed: int = 0) -> list[Example]:
    """n problems of a split: 'train', 'test' (2-6 shapes) or 'ood' (7-9 shapes)."""
    return draw_split("shapes", split, n, seed, split_of=_split_of,
                      make=lambda rng, ood: shapes_example(
                          rng, rng.randint(7, 9) if ood else rng.randint(2, 6))[0],
                      key=lambda ex: ex.images[0] + ex.prompt.encode())


# ----------------------------------------------------------------------------------------
# Stage 0 of the warm start: the vision tower learns to see
# ----------------------------------------------------------------------------------------

def teach_to_see(model, tok, *, steps: int = 800, seed: int = 0,
                 batch: int = 32) -> tuple[float, float]:
    """Train the tiny Qwen3-VL's vision tower, through a temporary linear head, to tell each
    image token's content (empty or a colour) and which cell it is, then centre its projector.
    Returns the head's (content, cell) accuracies on the last batch (both 100% by step 600).

    The role of a real VLM's pretrained vision encoder. Without it the warm start never reads
    the picture: its greedy answers are the same for every picture (always one shape, the
    commonest answer). A random tower's features do encode the cells (a linear probe reads a
    cell's colour from them), but as a small variation on a large vector common to every
    token, which the language model's RMSNorm passes on almost unchanged; handed one-hot
    colours instead, the same language model learns to count. Centring (the mean feature
    folded into each projector's last bias) removes the common vector: no layer changes, the
    checkpoint stays a plain Qwen3-VL.

    Which cell: the language model must write the cell's number ("159=3"), and M-RoPE puts an
    image token's position into attention scores only, never into the values that attention
    copies, so the tower writes it into the token (it has its own position embeddings). The
    learning rate decays linearly to zero: at a constant 1e-3 the head's accuracy collapses
    for a while (measured: 99.7% at step 125, 35% at 150, 92% at 200), and stopping inside such
    a dip leaves a tower that cannot see."""
    from PIL import Image
    inner = model.model
    hidden = model.config.get_text_config().hidden_size
    n_cells = GRID * GRID
    # content logits, then cell logits
    head, = probe_heads(hidden, (len(CHARS) + 1 + n_cells,), seed)
    params = list(inner.visual.parameters()) + list(head.parameters())
    rng = random.Random(f"see-{seed}")

    def pictures():
        drawn = [shapes_example(rng, rng.randint(2, 6)) for _ in range(batch)]
        px = tok.image_processor(images=[Image.open(io.BytesIO(e.images[0])).convert("RGB")
                                         for e, _ in drawn], return_tensors="pt")
        labels = [CHARS.index(c[0]) if c else len(CHARS) for _, cells in drawn for c in cells]
        return px["pixel_values"], px["image_grid_thw"], torch.tensor(labels)

    def features(pv, grid):  # (tokens, hidden) of the projector, and the deepstack ones
        out = inner.visual(pv, grid_thw=grid, return_dict=True)
        return out.pooler_output, list(out.deepstack_features or [])

    def batch_loss():
        pv, grid, labels = pictures()
        logits = head(features(pv, grid)[0])
        content, cell = logits[:, :len(CHARS) + 1], logits[:, len(CHARS) + 1:]
        where = torch.arange(len(labels)) % n_cells  # each picture's tokens in reading order
        loss = (torch.nn.functional.cross_entropy(content, labels)
                + torch.nn.functional.cross_entropy(cell, where))
        return loss, ((content.argmax(1) == labels).float().mean().item(),
                      (cell.argmax(1) == where).float().mean().item())

    acc = train_probes(params, steps, batch_loss) or (0.0, 0.0)
    with torch.no_grad():  # centre the projector and the deepstack projectors
        pv, grid, _ = pictures()
        main, deep = features(pv, grid)
        inner.visual.merger.linear_fc2.bias -= main.mean(0)
        for merger, f in zip(inner.visual.deepstack_merger_list, deep):
            merger.linear_fc2.bias -= f.mean(0)
    return acc
