"""CM-CGNS image-report pretraining of segmentation encoders, and retrieval of similar cases (spec §8).

- :mod:`medseg.pretrain.train`: ``pretrain_iter(PretrainConfig)``, two stages, checkpoints, an encoder pack.
- :mod:`medseg.pretrain.pack`: encoder packs and ``init_segmentation_encoder`` for ``medseg train --encoder-init``.
- :mod:`medseg.pretrain.retrieval`: index an archive of image-report pairs; the k most similar cases.
- :mod:`medseg.pretrain.losses`, :mod:`~medseg.pretrain.model`, :mod:`~medseg.pretrain.text`, :mod:`~medseg.pretrain.data`: the method's parts.
"""
