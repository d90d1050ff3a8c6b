"""The paper's experiments on a trained run: held-out evaluation, the geometry of the embeddings
(anisotropy, alignment), the Generation-Representation Scaling Law, continual pretraining."""
