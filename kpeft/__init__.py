"""kpeft: the kernel view of parameter-efficient fine-tuning."""

__version__ = "0.1.0"
