"""The agents' networks of pixel-like observations: MinAtar's and Atari's (Nature DQN).

Each ends in one ``nn.Linear`` (the layer the last-layer rung of the surrogate ladder reads) with
``outputs`` outputs: one per action (DQN), or ``atoms * actions`` (C51).
"""

from __future__ import annotations

import torch
from torch import nn


class MinAtarNetwork(nn.Module):
    """Conv(3x3, 16, stride 1) -> FC 128 -> FC outputs, ReLU (MinAtar's own DQN and the LaBER paper's
    Table 3). Input: MinAtar observations, ``[..., 10, 10, C]`` booleans (channels last).

    Examples:
        >>> net = MinAtarNetwork(in_channels=4, outputs=6)
        >>> net(torch.zeros(32, 10, 10, 4, dtype=torch.bool)).shape
        torch.Size([32, 6])
    """

    def __init__(self, in_channels: int, outputs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1)
        self.fc = nn.Linear(16 * 8 * 8, 128)
        self.out = nn.Linear(128, outputs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float().movedim(-1, -3)  # [..., 10, 10, C] -> [..., C, 10, 10]
        x = torch.relu(self.conv(x)).flatten(-3)
        return self.out(torch.relu(self.fc(x)))


class NatureCNN(nn.Module):
    """Conv(8x8, 32, stride 4) -> Conv(4x4, 64, stride 2) -> Conv(3x3, 64, stride 1) -> FC 512 -> FC outputs,
    ReLU (Mnih et al., 2015; the LaBER paper's Table 2). Input: ``[..., 4, 84, 84]`` uint8 frames."""

    def __init__(self, frames: int, outputs: int) -> None:
        super().__init__()
        self.torso = nn.Sequential(
            nn.Conv2d(frames, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64 * 7 * 7, 512)
        self.out = nn.Linear(512, outputs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # uint8 in the buffer (1 byte a pixel), scaled here: a float buffer would take 4x the memory.
        x = obs.float() / 255.0
        batch = x.shape[:-3]
        x = self.torso(x.reshape(-1, *x.shape[-3:])).flatten(1)
        return self.out(torch.relu(self.fc(x))).reshape(*batch, -1)
