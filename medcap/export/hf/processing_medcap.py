"""The processor of a model ``medcap export`` wrote: images as medcap's transform makes
them, prompts as medcap's chat format makes them (the same token ids).

Copied by ``medcap export`` into the model folder and loaded as remote code
(``AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)``).

In order: the image transform (``MedcapImageProcessor``: to RGB with transparency on
black, EXIF orientation applied, the shorter side resized to ``image_size`` (bicubic), a
centre crop, then normalised with the tower's mean and std); the processor
(``MedcapProcessor``: ``processor(images=img)`` is the captioning prompt, the image alone;
``processor(images=img, text=question)`` asks the question about it; a text that already
starts with ``<|begin_of_text|>`` (from ``apply_chat_template``) is taken as it stands).
Imports torch, transformers and Pillow; never medcap.
"""

import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

IMAGE_MARKER = "<image>"  # what marks the image in a message's text
BEGIN = "<|begin_of_text|>"


# ---- Images


def _to_rgb(img):
    """8-bit RGB as medcap makes it: transparency composited on black, 16/32-bit grey stretched."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = torch.tensor(list(img.getdata()), dtype=torch.float64).view(img.size[1], img.size[0])
        lo, hi = float(values.min()), float(values.max())
        grey = torch.zeros_like(values) if hi <= lo else (values.clamp(lo, hi) - lo) * (255.0 / (hi - lo))
        data = bytes(torch.round(grey).to(torch.uint8).flatten().tolist())
        return Image.frombytes("L", img.size, data).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if img.mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def _resize_center_crop(img, size):
    """The shorter side to ``size`` (bicubic; the longer truncated), a centre crop of ``size`` x ``size``."""
    if img.size == (size, size):
        return img
    w, h = img.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class MedcapImageProcessor(BaseImageProcessor):
    """PIL images -> ``pixel_values`` ``[n, 3, image_size, image_size]`` (float32)."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size=224, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    def pixels(self, image):
        """One image -> ``[3, S, S]``."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL images, got {type(image).__name__} (open files with PIL.Image.open)")
        img = _resize_center_crop(_to_rgb(ImageOps.exif_transpose(image)), self.image_size)
        s = self.image_size
        a = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3).to(torch.float32)
        a = a / torch.tensor(255, dtype=torch.float32)
        a = (a - torch.tensor(self.image_mean, dtype=torch.float32)) / torch.tensor(self.image_std, dtype=torch.float32)
        return a.permute(2, 0, 1).contiguous()  # [3, S, S]

    def preprocess(self, images, return_tensors=None, **kwargs):
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = torch.stack([self.pixels(im) for im in images])  # [n, 3, S, S]
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    def __call__(self, images, return_tensors=None, **kwargs):
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)


# ---- Prompts


def clean_question(text):
    """Question text that cannot be taken for an image marker (medcap's rule)."""
    s = str(text).replace("\u2460", "(1)").replace("<|image|>", "(image)").replace(IMAGE_MARKER, "(image)")
    return s.strip()


class MedcapProcessor(ProcessorMixin):
    """The image processor and the tokenizer; prompts in medcap's format (its chat template)."""

    model_input_names = ["input_ids", "attention_mask", "pixel_values"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=50, **kwargs):
        self.num_image_tokens = int(num_image_tokens)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def prompt(self, question=None, has_image=True):
        """The prompt text of one question (``None``: the image alone, a caption)."""
        q = clean_question(question) if question else ""
        if has_image:
            content = IMAGE_MARKER + ("\n\n" + q if q else "")
        elif q:
            content = q
        else:
            raise ValueError("a prompt needs an image or a text")
        messages = [{"role": "user", "content": content}]
        return self.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs):
        """``input_ids``, ``attention_mask`` (left padded) and ``pixel_values`` for one prompt
        per image (or per text when no image is given)."""
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if text is None or isinstance(text, str):
            texts = [text] * (len(images) if images is not None else 1)
        else:
            texts = list(text)
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(images)} image(s) but {len(texts)} text(s): give one text per image")
        prompts = [t if t and t.startswith(BEGIN) else self.prompt(t, has_image=images is not None) for t in texts]
        data = dict(self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors=return_tensors))
        if images is not None:
            data["pixel_values"] = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)
