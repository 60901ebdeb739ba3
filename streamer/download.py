"""`streamer download REPO_ID DEST`: fetch a Llama 3 checkpoint from the Hugging Face Hub, then split it."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from .errors import StreamerError
from .split import progress_bar, split

ORIGINAL = ["original/params.json", "original/consolidated.*.pth", "original/tokenizer.model"]
SAFETENSORS = ["config.json", "model*.safetensors", "model.safetensors.index.json", "original/tokenizer.model",
               "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]


def fetch(repo_id: str, cache_dir: Path | None = None, token: str | None = None) -> Path:
    """Download what a split needs (Meta's original/ files when the repo has them, else the safetensors set)
    and return the local snapshot folder. Offline (HF_HUB_OFFLINE=1) it uses the local cache only."""
    import huggingface_hub
    from huggingface_hub import errors, snapshot_download

    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    token = token or os.environ.get("HF_TOKEN") or None  # None lets the hub use the login cache
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except errors.HFValidationError as e:
        raise StreamerError(f"{repo_id!r} is not a valid repo id ({str(e).split('.')[0]}); expected e.g. "
                            "meta-llama/Meta-Llama-3-8B") from None
    if not offline:
        _check_reachable(huggingface_hub.constants.ENDPOINT)
    try:
        if offline:
            patterns = ORIGINAL + SAFETENSORS
        else:
            files = huggingface_hub.list_repo_files(repo_id, token=token)
            patterns = ORIGINAL if any(f.startswith("original/consolidated") for f in files) else SAFETENSORS
        path = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, token=token,
                                 local_files_only=offline)
    except errors.GatedRepoError:
        raise StreamerError(f"{repo_id} is gated: accept its licence on huggingface.co/{repo_id}, then run "
                            "`hf auth login` or set HF_TOKEN to a token with access") from None
    except errors.RepositoryNotFoundError:
        hint = "" if token or huggingface_hub.get_token() else " (no token found: set HF_TOKEN or run `hf auth login`)"
        raise StreamerError(f"{repo_id}: repository not found or not accessible{hint}") from None
    except errors.LocalEntryNotFoundError:
        raise StreamerError(f"{repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                            "(unset it to download)") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise StreamerError(f"{repo_id}: the Hub refused the token ({status}): check HF_TOKEN, or run "
                                "`hf auth login` again") from None
        raise StreamerError(f"{repo_id}: download failed ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise StreamerError(f"{repo_id}: download failed ({e.strerror or e})") from None
    except Exception as e:  # the HTTP client's own connection errors: one line, not a traceback
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
            raise
        raise StreamerError(f"{repo_id}: cannot reach the Hugging Face Hub ({e}); check the network, or set "
                            "HF_HUB_OFFLINE=1 to use what is already in the local cache") from None
    return Path(path)


def _check_reachable(endpoint: str, timeout: float = 10) -> None:
    """Fail at once, in one line, when the Hub's host cannot be reached, rather than after minutes of retries."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise StreamerError(f"cannot reach the Hugging Face Hub at {endpoint} ({e.strerror or e}): check the network, "
                            "or set HF_HUB_OFFLINE=1 to use what is already in the local cache") from None


def source_folder(snapshot: Path) -> Path:
    """The folder split should read: the safetensors set at the root, else Meta's original/."""
    if (snapshot / "config.json").is_file() and any(snapshot.glob("model*.safetensors")):
        return snapshot
    if (snapshot / "original" / "params.json").is_file():
        return snapshot / "original"
    raise StreamerError(f"{snapshot}: the download holds neither original/params.json nor config.json + model*.safetensors")


def setup_arg_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("repo_id", help="e.g. meta-llama/Meta-Llama-3-8B")
    p.add_argument("dst", type=Path, help="output folder for the split model")
    p.add_argument("--cache-dir", type=Path, help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--rope-scaling-factor", type=float,
                   help="Llama 3.1+ RoPE scaling factor (default: config.json's, or inferred from the shape)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    snapshot = fetch(args.repo_id, args.cache_dir)
    src = source_folder(snapshot)
    print(f"download: {args.repo_id} -> {src}", file=sys.stderr)
    split(src, args.dst, progress=progress_bar("split", not args.quiet), rope_scaling_factor=args.rope_scaling_factor)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0
