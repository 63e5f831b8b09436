"""fastsft's Triton kernels, installed as ``fastsft.triton_kernels`` (never as a top-level ``triton_kernels``,
which is another project's package). Import lazily: importing a module here imports triton."""
