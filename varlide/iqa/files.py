"""The files each learned pyiqa metric reads (pyiqa 0.1.16), as data beside the metrics."""

from __future__ import annotations

from varlide.weights.files import WeightFile, hf_file

PYIQA_BASE = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"

TORCHVISION_BASE = "https://download.pytorch.org/models"



def _pyiqa(name: str) -> WeightFile:
    return WeightFile(f"torch-hub:pyiqa/{name}", f"{PYIQA_BASE}/{name}", "pyiqa")

def _torchvision(name: str) -> WeightFile:
    return WeightFile(f"torch-hub:checkpoints/{name}", f"{TORCHVISION_BASE}/{name}",
                      "torchvision")



_OPENAI_RN50 = ("https://openaipublic.azureedge.net/clip/models/"
                "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")

_CLIP_RN50 = WeightFile("torch-hub:clip/RN50.pt", _OPENAI_RN50, "pyiqa",
                        sha256=_OPENAI_RN50.split("/")[-2])

_MANIQA_VIT = hf_file("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k", "model.safetensors",
                      "timm")

# Files each learned pyiqa metric (0.1.16) reads when it is built; pyiqa downloads them on
# first use into its cache, which a worker cannot do. Checked by tests against pyiqa's source.
PYIQA_FILES: dict[str, tuple[WeightFile, ...]] = {
    "niqe": (_pyiqa("niqe_modelparameters.mat"),),
    "niqe_matlab": (_pyiqa("niqe_matlab_params.mat"),),
    "ilniqe": (_pyiqa("ILNIQE_templateModel.mat"),),
    "brisque": (_pyiqa("brisque_svm_weights.pth"),),
    "brisque_matlab": (_pyiqa("brisque_matlab.mat"),),
    "musiq": (_pyiqa("musiq_koniq_ckpt-e95806b9.pth"),),
    "musiq-ava": (_pyiqa("musiq_ava_ckpt-e8d3f067.pth"),),
    "musiq-spaq": (_pyiqa("musiq_spaq_ckpt-358bb6af.pth"),),
    "musiq-paq2piq": (_pyiqa("musiq_paq2piq_ckpt-364c0c84.pth"),),
    "maniqa": (_pyiqa("ckpt_koniq10k.pt"), _MANIQA_VIT),
    "maniqa-kadid": (_pyiqa("ckpt_kadid10k.pt"), _MANIQA_VIT),
    "maniqa-pipal": (_pyiqa("MANIQA_PIPAL-ae6d356b.pth"), _MANIQA_VIT),
    "clipiqa": (_CLIP_RN50,),
    "clipiqa+": (_CLIP_RN50, _pyiqa("CLIP-IQA+_learned_prompts-603f3273.pth")),
    "lpips": (_pyiqa("LPIPS_v0.1_alex-df73285e.pth"), _torchvision("alexnet-owt-7be5be79.pth")),
    "lpips-vgg": (_pyiqa("LPIPS_v0.1_vgg-a78928a0.pth"), _torchvision("vgg16-397923af.pth")),
}

# pyiqa metrics that read no file at all (work offline as installed).
WEIGHT_FREE_PYIQA = frozenset({
    "piqe", "psnr", "psnry", "ssim", "ssimc", "ms_ssim", "cw_ssim", "fsim", "vif", "gmsd",
    "nlpd", "vsi", "mad", "entropy",
})



def metric_files(name: str) -> tuple[WeightFile, ...] | None:
    """Files a pyiqa metric needs: () for a weight-free one, None when not catalogued."""
    if name in WEIGHT_FREE_PYIQA:
        return ()
    return PYIQA_FILES.get(name)
