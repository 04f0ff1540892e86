"""Robot data on tf.data: RLDS reading, Open-X standardisation, mixtures, augmentation.

tf.data only: TensorFlow is used for input pipelines, never for models.
"""
