"""torchvision feature extractors as segkit backbones (registered by ``segkit_tv_backbones.backbones``)."""
