"""Label Studio bridge: conversion, pre-labelling, ML backend."""
