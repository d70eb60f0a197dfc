"""diffusion-unlearn: make a class-conditional diffusion model forget a class and measure how well it forgot."""

__version__ = "0.1.0"
