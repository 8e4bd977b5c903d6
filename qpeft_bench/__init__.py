"""qpeft-bench: parameter-efficient fine-tuning of quantized LLMs, swept and measured one way."""

import logging
from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).parent / "assets"

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 about an optional kernel package we do not use;
# it is noise for our users, so raise that logger's level before anything imports bitsandbytes.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
