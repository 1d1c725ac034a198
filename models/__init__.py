"""MAR (transformer + diffusion head) and the KL autoencoder, with upstream-compatible names."""
from models.mar import MAR, MAR_FACTORIES, build_released, mar_base, mar_huge, mar_large
from models.vae import KL16_CONFIG, VAE_LATENT_SCALE, AutoencoderKL

__all__ = ["MAR", "MAR_FACTORIES", "build_released", "mar_base", "mar_large", "mar_huge", "AutoencoderKL",
           "KL16_CONFIG", "VAE_LATENT_SCALE"]
