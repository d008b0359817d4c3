"""TFDS builder for 11k Hands with the SANO jewelry masks: ``tfds.builder('hands11k/256')``."""
from tfds_11k_hands.hands11k import Hands11k  # registers 'hands11k' with TFDS

__all__ = ['Hands11k']
