"""ResNet backbones (resnet12, resnet12-tf, resnet25): filled in by the models work."""
