"""The Ray layer: Tune studies (and later Train loops and Data pipelines) around the Ray-free core.

Ray is imported only inside this package.
"""
