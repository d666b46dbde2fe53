"""spatext: spatio-textual training data (pipeline), models (model) and evaluation (eval) for SpaText-style
controllable text-to-image generation. The parent package holds only the `spatext` command."""
