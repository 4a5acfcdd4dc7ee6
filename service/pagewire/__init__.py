"""pagewire: post-copy memory over userfaultfd."""

__version__ = "0.1.0"
