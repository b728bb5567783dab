"""The CLIP prior's default prompt ensembles, as data (no torch, no pydantic).

Why a module of its own: ``varlide.config`` (pydantic, yaml) holds them as the config's
defaults and ``varlide.priors.clip`` (torch) as the backend's; both import them from here,
so the priors import on a bare GPU machine (no pydantic) and the config never imports
torch. It sits outside ``varlide.priors``, whose ``__init__`` imports torch.
"""

# CLIP prior prompt ensembles (varlide/priors/clip.py, docs/METHOD.md "Priors"): antonym
# pairs, each [the attribute's high end, its low end]; v = P(first) for visibility pairs
# (bright ...), b = P(first) for blur pairs (blurry ...), averaged over the pairs.
DEFAULT_CLIP_VISIBILITY_PROMPTS = (
    ("a bright photo.", "a dark photo."),
    ("a well-lit photo.", "an underexposed photo."),
    ("a photo with good lighting.", "a photo taken in low light."),
    ("a clearly visible scene.", "a barely visible scene."),
)
DEFAULT_CLIP_BLUR_PROMPTS = (
    ("a blurry photo.", "a sharp photo."),
    ("an out-of-focus photo.", "an in-focus photo."),
    ("a photo with motion blur.", "a crisp photo."),
    ("blurry edges.", "sharp edges."),
)
