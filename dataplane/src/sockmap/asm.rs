//! A small assembler for eBPF instructions: just what the two programs in
//! `programs.rs` use, with named labels for jumps.
//!
//! The encoding is the kernel's (`struct bpf_insn`, 8 bytes: opcode,
//! dst/src registers in one byte, a signed 16-bit offset, a signed 32-bit
//! immediate), documented in the kernel's
//! `Documentation/bpf/standardization/instruction-set.rst`.

use std::collections::HashMap;

/// A register, r0 to r10 (r10 is the read-only frame pointer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Reg(pub(super) u8);

pub(super) const R0: Reg = Reg(0);
pub(super) const R1: Reg = Reg(1);
pub(super) const R2: Reg = Reg(2);
pub(super) const R3: Reg = Reg(3);
pub(super) const R4: Reg = Reg(4);
pub(super) const R5: Reg = Reg(5);
pub(super) const R6: Reg = Reg(6);
pub(super) const R7: Reg = Reg(7);
pub(super) const FP: Reg = Reg(10);

// Instruction classes.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
// Sizes and modes.
const W: u8 = 0x00;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
// Sources.
const K: u8 = 0x00;
const X: u8 = 0x08;
// ALU operations.
const ADD: u8 = 0x00;
const RSH: u8 = 0x70;
const MOV: u8 = 0xb0;
const END: u8 = 0xd0;
// Atomic operations (in the immediate).
const FETCH: i32 = 0x01;
const CMPXCHG: i32 = 0xf0 | FETCH;
// Pseudo source register of a 64-bit load: the immediate is a map's fd.
const PSEUDO_MAP_FD: u8 = 1;

/// A conditional jump.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cond {
    Eq,
    Ne,
}

impl Cond {
    fn op(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Ne => 0x50,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

/// Instructions being written; [`Asm::finish`] resolves the labels.
#[derive(Default)]
pub(super) struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<String, usize>,
    jumps: Vec<(usize, String)>,
    fresh: usize,
}

impl Asm {
    pub(super) fn new() -> Asm {
        Asm::default()
    }

    fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst: dst.0,
            src: src.0,
            off,
            imm,
        });
    }

    /// A label name no other call returns, for code emitted more than once.
    pub(super) fn fresh(&mut self, stem: &str) -> String {
        self.fresh += 1;
        format!("{stem}.{}", self.fresh)
    }

    /// Marks the next instruction as `name`.
    pub(super) fn label(&mut self, name: &str) {
        let previous = self.labels.insert(name.to_string(), self.insns.len());
        assert!(previous.is_none(), "label {name} defined twice");
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub(super) fn mov_imm(&mut self, dst: Reg, imm: i32) {
        self.push(ALU64 | MOV | K, dst, R0, 0, imm);
    }

    /// `dst = src` (64-bit).
    pub(super) fn mov(&mut self, dst: Reg, src: Reg) {
        self.push(ALU64 | MOV | X, dst, src, 0, 0);
    }

    /// `dst += imm` (64-bit).
    pub(super) fn add_imm(&mut self, dst: Reg, imm: i32) {
        self.push(ALU64 | ADD | K, dst, R0, 0, imm);
    }

    /// `dst = (u32)dst >> imm`.
    pub(super) fn rsh32_imm(&mut self, dst: Reg, imm: i32) {
        self.push(ALU | RSH | K, dst, R0, 0, imm);
    }

    /// `dst = htobe16(dst)`: swaps the low two bytes on a little-endian
    /// machine and clears the rest.
    pub(super) fn be16(&mut self, dst: Reg) {
        self.push(ALU | END | X, dst, R0, 0, 16);
    }

    /// `dst = *(u32 *)(src + off)`.
    pub(super) fn ldx_w(&mut self, dst: Reg, src: Reg, off: i16) {
        self.push(LDX | MEM | W, dst, src, off, 0);
    }

    /// `dst = *(u64 *)(src + off)`.
    pub(super) fn ldx_dw(&mut self, dst: Reg, src: Reg, off: i16) {
        self.push(LDX | MEM | DW, dst, src, off, 0);
    }

    /// `*(u32 *)(dst + off) = src`.
    pub(super) fn stx_w(&mut self, dst: Reg, off: i16, src: Reg) {
        self.push(STX | MEM | W, dst, src, off, 0);
    }

    /// `*(u32 *)(dst + off) = imm`.
    pub(super) fn st_w(&mut self, dst: Reg, off: i16, imm: i32) {
        self.push(ST | MEM | W, dst, R0, off, imm);
    }

    /// `dst = value` (a 64-bit constant; two instruction slots).
    pub(super) fn ld_imm64(&mut self, dst: Reg, value: u64) {
        self.push(LD | IMM | DW, dst, R0, 0, value as u32 as i32);
        self.push(0, R0, R0, 0, (value >> 32) as u32 as i32);
    }

    /// `dst = the map with this fd` (two instruction slots).
    pub(super) fn ld_map(&mut self, dst: Reg, fd: i32) {
        self.push(LD | IMM | DW, dst, Reg(PSEUDO_MAP_FD), 0, fd);
        self.push(0, R0, R0, 0, 0);
    }

    /// `dst = fp + off`: the address of a stack slot.
    pub(super) fn stack_addr(&mut self, dst: Reg, off: i32) {
        self.mov(dst, FP);
        self.add_imm(dst, off);
    }

    /// Jumps to `label` when `(u32)dst cond imm`.
    pub(super) fn jmp32_imm(&mut self, cond: Cond, dst: Reg, imm: i32, label: &str) {
        self.jumps.push((self.insns.len(), label.to_string()));
        self.push(JMP32 | cond.op() | K, dst, R0, 0, imm);
    }

    /// Jumps to `label` when `dst cond imm` (64-bit, imm sign-extended).
    pub(super) fn jmp_imm(&mut self, cond: Cond, dst: Reg, imm: i32, label: &str) {
        self.jumps.push((self.insns.len(), label.to_string()));
        self.push(JMP | cond.op() | K, dst, R0, 0, imm);
    }

    /// Jumps to `label` when `dst cond src` (64-bit).
    pub(super) fn jmp_reg(&mut self, cond: Cond, dst: Reg, src: Reg, label: &str) {
        self.jumps.push((self.insns.len(), label.to_string()));
        self.push(JMP | cond.op() | X, dst, src, 0, 0);
    }

    /// Jumps to `label`.
    pub(super) fn ja(&mut self, label: &str) {
        self.jumps.push((self.insns.len(), label.to_string()));
        self.push(JMP, R0, R0, 0, 0);
    }

    /// Calls helper number `helper` (arguments in r1-r5, result in r0;
    /// r1-r5 are clobbered).
    pub(super) fn call(&mut self, helper: i32) {
        self.push(JMP | 0x80, R0, R0, 0, helper);
    }

    pub(super) fn exit(&mut self) {
        self.push(JMP | 0x90, R0, R0, 0, 0);
    }

    /// Atomically: if `*(u32 *)(dst + off) == (u32)r0` then store `src`
    /// there; r0 gets the old value either way.
    pub(super) fn cmpxchg32(&mut self, dst: Reg, off: i16, src: Reg) {
        self.push(STX | ATOMIC | W, dst, src, off, CMPXCHG);
    }

    /// Atomically `*(u64 *)(dst + off) += src`.
    pub(super) fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) {
        self.push(STX | ATOMIC | DW, dst, src, off, i32::from(ADD));
    }

    /// The program as the kernel takes it, jumps resolved.
    pub(super) fn finish(mut self) -> Result<Vec<u64>, String> {
        for (at, label) in &self.jumps {
            let target = *self
                .labels
                .get(label)
                .ok_or_else(|| format!("jump to undefined label {label}"))?;
            if target > self.insns.len() - 1 {
                return Err(format!("label {label} is past the last instruction"));
            }
            let off = target as i64 - (*at as i64 + 1);
            self.insns[*at].off = i16::try_from(off)
                .map_err(|_| format!("jump to {label} is too far ({off} instructions)"))?;
        }
        Ok(self
            .insns
            .iter()
            .map(|i| {
                u64::from_le_bytes([
                    i.code,
                    (i.src << 4) | (i.dst & 0x0f),
                    i.off.to_le_bytes()[0],
                    i.off.to_le_bytes()[1],
                    i.imm.to_le_bytes()[0],
                    i.imm.to_le_bytes()[1],
                    i.imm.to_le_bytes()[2],
                    i.imm.to_le_bytes()[3],
                ])
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64]) -> Vec<[u8; 8]> {
        words.iter().map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn encodes_as_the_kernel_does() {
        let mut a = Asm::new();
        a.mov_imm(R0, 1); // b7 00 0000 01000000
        a.ldx_w(R2, R6, 64); // 61 62 4000 00000000
        a.stx_w(FP, -4, R3); // 63 3a fcff 00000000
        a.call(71); // 85 00 0000 47000000
        a.exit(); // 95
        let got = bytes(&a.finish().unwrap());
        assert_eq!(got[0], [0xb7, 0x00, 0, 0, 1, 0, 0, 0]);
        assert_eq!(got[1], [0x61, 0x62, 0x40, 0, 0, 0, 0, 0]);
        assert_eq!(got[2], [0x63, 0x3a, 0xfc, 0xff, 0, 0, 0, 0]);
        assert_eq!(got[3], [0x85, 0x00, 0, 0, 71, 0, 0, 0]);
        assert_eq!(got[4], [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn jumps_are_relative_to_the_next_instruction() {
        let mut a = Asm::new();
        a.jmp32_imm(Cond::Eq, R2, 4, "end"); // 0
        a.ld_imm64(R1, 0x1122_3344_5566_7788); // 1, 2
        a.ja("end"); // 3
        a.label("end");
        a.exit(); // 4
        let got = bytes(&a.finish().unwrap());
        assert_eq!(got[0], [0x16, 0x02, 3, 0, 4, 0, 0, 0]);
        assert_eq!(got[1], [0x18, 0x01, 0, 0, 0x88, 0x77, 0x66, 0x55]);
        assert_eq!(got[2], [0, 0, 0, 0, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(got[3], [0x05, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn atomics_and_map_loads() {
        let mut a = Asm::new();
        a.cmpxchg32(R7, 0, R1);
        a.atomic_add64(R0, 8, R1);
        a.ld_map(R2, 9);
        a.be16(R3);
        let got = bytes(&a.finish().unwrap());
        assert_eq!(got[0], [0xc3, 0x17, 0, 0, 0xf1, 0, 0, 0]);
        assert_eq!(got[1], [0xdb, 0x10, 8, 0, 0, 0, 0, 0]);
        assert_eq!(got[2], [0x18, 0x12, 0, 0, 9, 0, 0, 0]);
        assert_eq!(got[4], [0xdc, 0x03, 0, 0, 16, 0, 0, 0]);
    }

    #[test]
    fn an_undefined_label_is_an_error() {
        let mut a = Asm::new();
        a.ja("nowhere");
        a.exit();
        assert_eq!(a.finish().unwrap_err(), "jump to undefined label nowhere");
    }
}
