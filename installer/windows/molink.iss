; MoLink for Windows: Inno Setup 6 script over the PyInstaller one-folder bundle (dist\molink).
;
;   iscc /DAppVersion=0.1.0 /DBundleDir=..\..\dist\molink installer\windows\molink.iss
;
; Per user, no administrator: installs to %LOCALAPPDATA%\Programs\MoLink (the user may pick another folder),
; a Start menu entry, the molink:// link handler (HKCU\Software\Classes\molink), the folder on the user's PATH
; (task, on by default) and, only on a first install and only if ticked, start at login (the same HKCU Run
; value "MoLink" the app's own setting writes: app/desktop/_windows_autostart.py; an upgrade never re-adds it).
; Setup does no network work: the engine runtime (PyTorch) is made per user on first use by the app
; (app/runtime.py) in %LOCALAPPDATA%\molink\rt.
; Before files are replaced or removed, the running app is asked to quit (molink-tray.exe --quit: it stops
; its engine processes through their control channel and waits for them), with taskkill as the fallback.
; The uninstaller removes what setup and the app registered (link handler, Run and StartupApproved values,
; PATH entry) and asks whether to delete the engine runtime and the downloaded models too; groups, keys and
; settings stay unless the user deletes %LOCALAPPDATA%\molink.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef BundleDir
  #define BundleDir "..\..\dist\molink"
#endif
#ifndef OutputDir
  #define OutputDir "..\..\dist"
#endif
#define AppName "MoLink"
#define TrayExe "molink-tray.exe"

[Setup]
AppId={{6F3E2A94-1C5B-4E7D-9A38-2B7C5D1E8F40}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher=MoLink
VersionInfoVersion={#AppVersion}
DefaultDirName={localappdata}\Programs\MoLink
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
UsePreviousAppDir=yes
PrivilegesRequired=lowest
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir={#OutputDir}
OutputBaseFilename=MoLink-Setup-{#AppVersion}
SetupIconFile=..\..\assets\icons\molink.ico
UninstallDisplayIcon={app}\{#TrayExe}
UninstallDisplayName={#AppName}
Compression=lzma2/ultra64
SolidCompression=yes
WizardStyle=modern
SetupMutex=MoLinkSetupMutex
CloseApplications=no
ChangesAssociations=yes
ChangesEnvironment=yes
SetupLogging=yes

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "addtopath"; Description: "Add the molink command to my PATH"
Name: "autostart"; Description: "Start MoLink when I sign in"; Flags: unchecked; Check: not IsUpgrade

[InstallDelete]
; the previous version's bundle: no stale DLLs or modules mixed with the new ones
Type: filesandordirs; Name: "{app}\_internal"

[Files]
Source: "{#BundleDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#TrayExe}"; AppUserModelID: "MoLink.MoLink"

[Registry]
Root: HKCU; Subkey: "Software\Classes\molink"; ValueType: string; ValueName: ""; ValueData: "URL:MoLink link"; Flags: uninsdeletekey
Root: HKCU; Subkey: "Software\Classes\molink"; ValueType: string; ValueName: "URL Protocol"; ValueData: ""
Root: HKCU; Subkey: "Software\Classes\molink\DefaultIcon"; ValueType: string; ValueName: ""; ValueData: """{app}\{#TrayExe}"",0"
Root: HKCU; Subkey: "Software\Classes\molink\shell\open\command"; ValueType: string; ValueName: ""; ValueData: """{app}\{#TrayExe}"" ""%1"""
Root: HKCU; Subkey: "Software\Microsoft\Windows\CurrentVersion\Run"; ValueType: string; ValueName: "MoLink"; ValueData: """{app}\{#TrayExe}"" --background"; Tasks: autostart

[Run]
Filename: "{app}\{#TrayExe}"; Description: "Start MoLink"; Flags: nowait postinstall skipifsilent

[Code]
const
  RunKey = 'Software\Microsoft\Windows\CurrentVersion\Run';
  ApprovedKey = 'Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run';
  EnvKey = 'Environment';
  AppKey = 'Software\MoLink';
  UninstallKey = 'Software\Microsoft\Windows\CurrentVersion\Uninstall\{6F3E2A94-1C5B-4E7D-9A38-2B7C5D1E8F40}_is1';

function IsUpgrade: Boolean;
begin
  Result := RegKeyExists(HKCU, UninstallKey);
end;

{ Ask a running MoLink (of this user) to quit and wait for it; then make sure. }
procedure QuitRunningApp(const Dir: String);
var
  Code: Integer;
begin
  if FileExists(Dir + '\{#TrayExe}') then
    Exec(Dir + '\{#TrayExe}', '--quit', '', SW_HIDE, ewWaitUntilTerminated, Code);
  Exec(ExpandConstant('{sys}\taskkill.exe'), '/F /T /IM {#TrayExe}', '', SW_HIDE, ewWaitUntilTerminated, Code);
end;

function PrepareToInstall(var NeedsRestart: Boolean): String;
var
  Previous: String;
begin
  Result := '';
  if RegQueryStringValue(HKCU, UninstallKey, 'InstallLocation', Previous) then
    QuitRunningApp(RemoveBackslashUnlessRoot(Previous));
end;

function PathHas(const Path, Dir: String): Boolean;
begin
  Result := Pos(';' + Uppercase(Dir) + ';', ';' + Uppercase(Path) + ';') > 0;
end;

procedure AddToPath(const Dir: String);
var
  Path: String;
begin
  if not RegQueryStringValue(HKCU, EnvKey, 'Path', Path) then
    Path := '';
  if PathHas(Path, Dir) then
    exit;
  if (Path <> '') and (Copy(Path, Length(Path), 1) <> ';') then
    Path := Path + ';';
  RegWriteExpandStringValue(HKCU, EnvKey, 'Path', Path + Dir);
end;

procedure RemoveFromPath(const Dir: String);
var
  Path: String;
  P: Integer;
begin
  if not RegQueryStringValue(HKCU, EnvKey, 'Path', Path) then
    exit;
  Path := ';' + Path + ';';
  P := Pos(';' + Uppercase(Dir) + ';', Uppercase(Path));
  if P = 0 then
    exit;
  Delete(Path, P, Length(Dir) + 1);
  Path := Copy(Path, 2, Length(Path) - 2);
  RegWriteExpandStringValue(HKCU, EnvKey, 'Path', Path);
end;

procedure CurStepChanged(CurStep: TSetupStep);
begin
  if (CurStep = ssPostInstall) and WizardIsTaskSelected('addtopath') then
    AddToPath(ExpandConstant('{app}'));
end;

function InitializeUninstall(): Boolean;
begin
  QuitRunningApp(ExpandConstant('{app}'));
  Result := True;
end;

procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
var
  Data: String;
  Ports: String;
  Port: Cardinal;
  Code: Integer;
begin
  if CurUninstallStep = usUninstall then
  begin
    RemoveFromPath(ExpandConstant('{app}'));
    { start at login, whoever turned it on (setup or the app's settings) }
    RegDeleteValue(HKCU, RunKey, 'MoLink');
    RegDeleteValue(HKCU, ApprovedKey, 'MoLink');
    { the firewall rule, only when the app wrote one (app/desktop/system/firewall.py records its ports; older
      versions recorded one port as a DWORD under another name and named the rule "MoLink group port"):
      removing both names takes the same one elevation that writing the rule did }
    if RegQueryStringValue(HKCU, AppKey, 'FirewallRulePorts', Ports) or
       RegQueryDWordValue(HKCU, AppKey, 'FirewallRulePort', Port) then
    begin
      ShellExec('runas', ExpandConstant('{cmd}'), '/c netsh advfirewall firewall delete rule name="MoLink" & ' +
        'netsh advfirewall firewall delete rule name="MoLink group port"', '', SW_HIDE, ewWaitUntilTerminated, Code);
      RegDeleteValue(HKCU, AppKey, 'FirewallRulePorts');
      RegDeleteValue(HKCU, AppKey, 'FirewallRulePort');
      RegDeleteKeyIfEmpty(HKCU, AppKey);
    end;
  end;
  if CurUninstallStep = usPostUninstall then
  begin
    Data := ExpandConstant('{localappdata}\molink');
    if DirExists(Data + '\rt') or DirExists(Data + '\Cache') then
      if SuppressibleMsgBox('Also delete the MoLink engine (PyTorch) and the downloaded models?' + #13#10 + #13#10 +
          'They take several GB in ' + Data + '. Your groups, keys and settings are kept either way.',
          mbConfirmation, MB_YESNO or MB_DEFBUTTON2, IDNO) = IDYES then
      begin
        DelTree(Data + '\rt', True, True, True);
        DelTree(Data + '\Cache', True, True, True);
      end;
  end;
end;
